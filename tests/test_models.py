"""Checks every skin-dualnet model must pass, on the tiny presets (CPU, 64 px, batch 2).

`ModelTesterMixin` holds what every path through a model must do (shapes, determinism, save/load, offload, remote
code); `TrainingTesterMixin` what every model must do once (loss and backward, initialisation, checkpointing, output
options). The classifier's predicted-mask path takes the first only: the training checks do not depend on where the
mask came from.
"""

import json
import math

import pytest
import timm
import torch
from conftest import PRESETS, tiny_classifier, tiny_segmenter
from isolation import run_isolated
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForSemanticSegmentation

import modeling_skinlesion as sl
from modeling_skinlesion.segmentation_skinlesion import segmentation_loss

BATCH = 2


def lesion_like_mask(size: int, batch: int = BATCH) -> torch.Tensor:
    """A centred disc per image: a plausible lesion mask."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((ys - size / 2) ** 2 + (xs - size / 2) ** 2 < (size / 4) ** 2).float()
    return disc.expand(batch, 1, size, size).clone()


class ModelTesterMixin:
    """Shared checks of one path through a model (transformers / diffusers style). Subclasses provide the model
    (`build`: a seeded tiny model in eval mode, from `conftest`) and its inputs."""

    model_class: type
    auto_class: type

    def build(self):
        raise NotImplementedError

    def make_inputs(self, config, with_labels: bool = False) -> dict:
        raise NotImplementedError

    def check_output_shapes(self, config, outputs) -> None:
        raise NotImplementedError

    def make_model(self):
        model = self.build()
        return model, model.config

    def test_output_shapes(self):
        model, config = self.make_model()
        model.eval()
        with torch.no_grad():
            outputs = model(**self.make_inputs(config))
        self.check_output_shapes(config, outputs)
        assert torch.isfinite(outputs.logits).all()

    def test_eval_is_deterministic(self):
        model, config = self.make_model()
        model.eval()
        inputs = self.make_inputs(config)
        with torch.no_grad():
            first, second = model(**inputs).logits, model(**inputs).logits
        assert torch.equal(first, second)

    def test_save_load_roundtrip_is_exact(self, tmp_path):
        model, config = self.make_model()
        model.eval()
        model.save_pretrained(tmp_path)
        files = {p.name for p in tmp_path.iterdir()}
        assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
        reloaded = self.auto_class.from_pretrained(tmp_path).eval()
        assert type(reloaded) is self.model_class
        inputs = self.make_inputs(config)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)
        generic = AutoModel.from_pretrained(tmp_path).eval()
        assert type(generic) is self.model_class

    def test_device_map_auto_with_cpu_and_disk_offload_gives_the_same_logits(self, tmp_path):
        model, config = self.make_model()
        model.eval().save_pretrained(tmp_path / "model")
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        offloaded = self.auto_class.from_pretrained(
            tmp_path / "model", device_map="auto", max_memory={"cpu": size // 3}, offload_folder=tmp_path / "offload"
        ).eval()
        assert "disk" in set(offloaded.hf_device_map.values()), offloaded.hf_device_map
        inputs = self.make_inputs(config)
        with torch.no_grad():
            torch.testing.assert_close(offloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-6)

    @pytest.mark.slow
    def test_remote_code_load_without_package(self, tmp_path):
        model, config = self.make_model()
        model.eval()
        folder = tmp_path / "model"
        model.save_pretrained(folder)
        saved = json.loads((folder / "config.json").read_text())
        assert {"AutoConfig", "AutoModel"} <= set(saved["auto_map"])
        # The class's own module and every sibling it imports are copied flat beside the weights.
        module = saved["auto_map"]["AutoModel"].split(".")[0]
        for name in ("configuration_skinlesion", "pretrained_skinlesion", module):
            assert (folder / f"{name}.py").is_file(), name
        inputs = self.make_inputs(config)
        torch.save({k: v for k, v in inputs.items()}, tmp_path / "inputs.pt")
        with torch.no_grad():
            torch.save(model(**inputs).logits, tmp_path / "expected.pt")
        run_isolated(
            f"""
            import torch
            from transformers import AutoModel
            model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
            assert "transformers_modules" in type(model).__module__, type(model).__module__
            inputs = torch.load({str(tmp_path / "inputs.pt")!r})
            with torch.no_grad():
                logits = model(**inputs).logits
            torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), rtol=0, atol=0)
            print("remote ok")
            """,
            cwd=tmp_path / "run",
        )


class TrainingTesterMixin:
    """Shared checks every model passes once: training, initialisation and output options."""

    def test_loss_and_backward_reach_every_trainable_parameter(self):
        model, config = self.make_model()
        model.train()
        outputs = model(**self.make_inputs(config, with_labels=True))
        assert outputs.loss is not None and outputs.loss.ndim == 0 and torch.isfinite(outputs.loss)
        outputs.loss.backward()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable, "the model has no trainable parameter"
        missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
        assert not missing, f"no gradient reached: {missing[:10]}"
        silent = sorted(n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p.grad).all())
        assert not silent, f"non-finite gradients: {silent[:10]}"

    def test_fresh_model_has_live_features(self):
        # post_init's default init would re-draw the timm trunk from N(0, 0.02) and its output would collapse.
        model, config = self.make_model()
        model.eval()
        pixel_values = self.make_inputs(config)["pixel_values"]
        with torch.no_grad():
            for name, trunk in self.trunks(model):
                features = trunk(pixel_values)
                features = features[-1] if isinstance(features, list) else trunk.forward_features(pixel_values)
                assert features.std() > 1e-2, f"{name} output collapsed (std {features.std():.2e})"
                # The trunk keeps timm's own initialisation: each conv's spread matches a freshly built timm model.
                reference = dict(timm.create_model(trunk.default_cfg["architecture"]).named_modules())
                compared = 0
                for module_name, module in trunk.named_modules():
                    if (
                        isinstance(module, torch.nn.Conv2d)
                        and module.weight.numel() > 256
                        and module_name in reference
                    ):
                        ratio = module.weight.std() / reference[module_name].weight.std()
                        assert 0.67 < ratio < 1.5, f"{name}.{module_name} re-initialised (std ratio {ratio:.2f})"
                        compared += 1
                assert compared >= 3, f"only {compared} convs of {name} could be compared"

    def test_checkpoint_missing_a_trunk_loads_initialised_weights(self, tmp_path):
        """A checkpoint without one trunk's weights: the missing keys are reported and get timm's initialisation (not
        uninitialised memory), so the logits are finite and deterministic and the trunk's features are alive."""
        from safetensors.torch import load_file, save_file

        model, config = self.make_model()
        model.save_pretrained(tmp_path)
        weights = load_file(tmp_path / "model.safetensors")
        prefix = self.trunks(model)[-1][0] + "."
        kept = {key: value for key, value in weights.items() if not key.startswith(prefix)}
        assert len(kept) < len(weights)
        save_file(kept, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        reloaded, info = self.auto_class.from_pretrained(tmp_path, output_loading_info=True)
        reloaded.eval()
        missing = [key for key in info["missing_keys"] if not key.endswith("num_batches_tracked")]
        assert missing and all(key.startswith(prefix) for key in missing), missing[:5]
        inputs = self.make_inputs(config)
        with torch.no_grad():
            first, second = reloaded(**inputs).logits, reloaded(**inputs).logits
        assert torch.isfinite(first).all() and torch.equal(first, second)
        trunk = dict(self.trunks(reloaded))[prefix[:-1]]
        with torch.no_grad():
            features = trunk(inputs["pixel_values"])
            features = features[-1] if isinstance(features, list) else trunk.forward_features(inputs["pixel_values"])
        assert torch.isfinite(features).all() and features.std() > 1e-2

    def test_return_dict_false_gives_the_same_values_as_a_tuple(self):
        model, config = self.make_model()
        model.eval()
        inputs = self.make_inputs(config, with_labels=True)
        with torch.no_grad():
            as_dict = model(**inputs)
            as_tuple = model(**inputs, return_dict=False)
            model.config.return_dict = False
            from_config = model(**inputs)
        expected = [value for value in as_dict.values() if value is not None]
        for values in (as_tuple, from_config):
            assert isinstance(values, tuple) and len(values) == len(expected)
            for got, want in zip(values, expected):
                if isinstance(want, torch.Tensor):
                    torch.testing.assert_close(got, want, rtol=0, atol=0)

    def test_output_attentions_and_hidden_states_follow_the_config(self):
        model, config = self.make_model()
        model.eval()
        with torch.no_grad():
            assert model(**self.make_inputs(config)).attentions is None
            model.config._attn_implementation = "eager"  # transformers allows config.output_attentions with eager only
            model.config.output_attentions = True
            model.config.output_hidden_states = True
            outputs = model(**self.make_inputs(config))
            assert outputs.attentions is not None and len(outputs.attentions) > 0
            assert any(name.endswith("hidden_states") and value for name, value in outputs.items())
            overridden = model(**self.make_inputs(config), output_attentions=False, output_hidden_states=False)
        assert overridden.attentions is None
        assert not any(name.endswith("hidden_states") for name, value in overridden.items() if value is not None)

    def test_gradient_checkpointing_gives_the_same_gradients(self):
        model, config = self.make_model()
        model.train()
        inputs = self.make_inputs(config, with_labels=True)

        def gradients() -> dict[str, torch.Tensor]:
            model.zero_grad()
            torch.manual_seed(0)
            model(**inputs).loss.backward()
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        plain = gradients()
        model.activation_checkpointing_enable()
        assert all(trunk.grad_checkpointing for _, trunk in self.trunks(model) if hasattr(trunk, "grad_checkpointing"))
        checkpointed = gradients()
        assert plain.keys() == checkpointed.keys() and plain
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


class TestSegmenter(ModelTesterMixin, TrainingTesterMixin):
    model_class = sl.SkinLesionSegmenter
    auto_class = AutoModelForSemanticSegmentation

    def build(self):
        return tiny_segmenter()

    def make_inputs(self, config, with_labels=False):
        torch.manual_seed(1)
        inputs = {"pixel_values": torch.randn(BATCH, 3, config.image_size, config.image_size)}
        if with_labels:
            inputs["labels"] = lesion_like_mask(config.image_size)
        return inputs

    def check_output_shapes(self, config, outputs):
        assert outputs.logits.shape == (BATCH, 1, config.image_size, config.image_size)

    def trunks(self, model):
        return [("encoder", model.encoder)]

    def test_attention_maps_per_gate(self):
        model, config = self.make_model()
        outputs = model.eval()(**self.make_inputs(config), output_attentions=True)
        assert len(outputs.attentions) == 4
        sizes = [a.shape[-1] for a in outputs.attentions]
        assert sizes == [config.image_size // s for s in (16, 8, 4, 2)]
        assert all(a.shape[:2] == (BATCH, 1) for a in outputs.attentions)  # one spatial gate per pixel

    def test_non_square_and_non_multiple_of_32_inputs(self):
        model, _ = self.make_model()
        with torch.no_grad():
            logits = model.eval()(pixel_values=torch.randn(1, 3, 50, 75)).logits
        assert logits.shape == (1, 1, 50, 75)

    def test_loss_is_bce_plus_soft_dice(self):
        # Logits 0 give probability 1/2 everywhere: BCE = ln 2 whatever the mask, and the soft Dice (smoothed by 1)
        # of a 4 x 4 mask with 6 lesion pixels is (2 * 3 + 1) / (8 + 6 + 1) = 7 / 15.
        mask = torch.zeros(1, 1, 4, 4)
        mask[0, 0, 1:3, 1:4] = 1
        zeros = torch.zeros_like(mask)
        torch.testing.assert_close(segmentation_loss(zeros, mask, 1.0, 0.0), torch.tensor(math.log(2)))
        torch.testing.assert_close(segmentation_loss(zeros, mask, 0.0, 1.0), torch.tensor(1 - 7 / 15))
        torch.testing.assert_close(segmentation_loss(zeros, mask, 0.5, 2.0), torch.tensor(0.5 * math.log(2) + 16 / 15))
        # Confident and right: both terms vanish. Confident and inverted: the prediction is the 10 background pixels,
        # so the soft Dice is only the smoothing, 1 / (10 + 6 + 1).
        assert segmentation_loss(mask * 40 - 20, mask, 1.0, 1.0) < 1e-6
        torch.testing.assert_close(
            segmentation_loss(20 - mask * 40, mask, 0.0, 1.0), torch.tensor(16 / 17), atol=1e-6, rtol=0
        )

    def test_image_size_below_the_encoders_stride_is_refused(self):
        config = AutoConfig.from_pretrained(PRESETS / "segmenter-tiny.json", image_size=16)
        with pytest.raises(ValueError, match=r"`image_size` must be at least 32 \(the encoder's total stride"):
            sl.SkinLesionSegmenter(config)


class TestClassifier(ModelTesterMixin, TrainingTesterMixin):
    model_class = sl.SkinDualNet
    auto_class = AutoModelForImageClassification

    def build(self):
        return tiny_classifier()

    def make_inputs(self, config, with_labels=False):
        torch.manual_seed(1)
        inputs = {
            "pixel_values": torch.randn(BATCH, 3, config.image_size, config.image_size),
            "age": torch.tensor([55.0, float("nan")]),
            "sex_ids": torch.tensor([2, 0]),
            "site_ids": torch.tensor([1, 5]),
            "lesion_mask": lesion_like_mask(config.image_size),
        }
        if with_labels:
            inputs["labels"] = torch.tensor([0, config.num_labels - 1])
        return inputs

    def check_output_shapes(self, config, outputs):
        assert outputs.logits.shape == (BATCH, config.num_labels)
        for name in ("image_embeds", "lesion_embeds", "metadata_embeds"):
            assert getattr(outputs, name).shape == (BATCH, config.fusion_dim)
        assert outputs.lesion_pixel_values.shape == (BATCH, 3, config.image_size, config.image_size)
        assert outputs.lesion_boxes.shape == (BATCH, 4) and outputs.mask_empty.shape == (BATCH,)

    def trunks(self, model):
        return [
            ("image_encoder.trunk", model.image_encoder.trunk),
            ("lesion_encoder.trunk", model.lesion_encoder.trunk),
        ]

    def test_segmenter_is_frozen_and_used_without_mask(self):
        model, config = self.make_model()
        assert not any(p.requires_grad for p in model.segmenter.parameters())
        model.train()
        inputs = self.make_inputs(config, with_labels=True)
        inputs.pop("lesion_mask")
        outputs = model(**inputs)
        assert outputs.lesion_mask.shape == (BATCH, 1, config.image_size, config.image_size)
        assert set(outputs.lesion_mask.unique().tolist()) <= {0.0, 1.0}
        assert model.segmenter.training, "the caller's train mode must be restored after segmenting"
        outputs.loss.backward()

    def test_cross_attention_weights(self):
        model, config = self.make_model()
        with torch.no_grad():
            outputs = model.eval()(**self.make_inputs(config), output_attentions=True)
        tokens = (config.image_size // 32) ** 2
        assert len(outputs.cross_attentions) == 2 * config.fusion_layers
        for weights in outputs.cross_attentions:
            assert weights.shape == (BATCH, config.fusion_heads, tokens, tokens)
            torch.testing.assert_close(weights.sum(-1), torch.ones(BATCH, config.fusion_heads, tokens))
        assert [w.shape for w in outputs.attentions] == [(BATCH, config.metadata_heads, 4, 4)] * config.metadata_layers

    def test_hidden_states_of_both_branches_and_the_fusion(self):
        model, config = self.make_model()
        with torch.no_grad():
            plain = model.eval()(**self.make_inputs(config))
            outputs = model(**self.make_inputs(config), output_hidden_states=True)
        torch.testing.assert_close(outputs.logits, plain.logits)  # the intermediates path gives the same features
        expected = [info["num_chs"] for info in model.image_encoder.trunk.feature_info]
        for states in (outputs.image_hidden_states, outputs.lesion_hidden_states):
            assert [s.shape[1] for s in states] == expected and all(s.shape[0] == BATCH for s in states)
        assert len(outputs.fusion_hidden_states) == 2 * config.fusion_layers
        tokens = (config.image_size // 32) ** 2
        assert all(s.shape == (BATCH, tokens, config.fusion_dim) for s in outputs.fusion_hidden_states)

    def test_sdpa_is_the_default_and_eager_gives_the_same_logits(self, tmp_path):
        model, config = self.make_model()
        model.save_pretrained(tmp_path)
        sdpa = sl.SkinDualNet.from_pretrained(tmp_path).eval()
        eager = sl.SkinDualNet.from_pretrained(tmp_path, attn_implementation="eager").eval()
        assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
        inputs = self.make_inputs(config)
        with torch.no_grad():
            torch.testing.assert_close(sdpa(**inputs).logits, eager(**inputs).logits, rtol=1e-5, atol=1e-6)

    def test_checkpoints_with_the_multihead_attention_layout_load_with_identical_outputs(self, tmp_path):
        """Weights saved before the q/k/v/o projections (nn.MultiheadAttention: fused in_proj, out_proj) are split
        and renamed on load; saving again writes the new layout."""
        from safetensors.torch import load_file, save_file

        model, config = self.make_model()
        model.eval().save_pretrained(tmp_path)
        weights = load_file(tmp_path / "model.safetensors")
        legacy = {}
        for key, value in weights.items():
            if ".q_proj." in key:
                parts = [weights[key.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
                legacy[key.replace("q_proj.", "in_proj_")] = torch.cat(parts)
            elif ".k_proj." in key or ".v_proj." in key:
                continue
            else:
                legacy[key.replace(".o_proj.", ".out_proj.")] = value
        assert any("in_proj_weight" in key for key in legacy) and any(".out_proj." in key for key in legacy)
        save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        reloaded, info = sl.SkinDualNet.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        inputs = self.make_inputs(config)
        with torch.no_grad():
            torch.testing.assert_close(reloaded.eval()(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-6)
        reloaded.save_pretrained(tmp_path / "again")
        assert not any("in_proj" in key for key in load_file(tmp_path / "again" / "model.safetensors"))

    def test_image_only_and_partial_metadata(self):
        model, config = self.make_model()
        model.eval()
        inputs = self.make_inputs(config)
        with torch.no_grad():
            full = model(**inputs).logits
            image_only = model(pixel_values=inputs["pixel_values"], lesion_mask=inputs["lesion_mask"]).logits
            explicit_missing = model(
                pixel_values=inputs["pixel_values"],
                lesion_mask=inputs["lesion_mask"],
                age=torch.full((BATCH,), float("nan")),
                sex_ids=torch.zeros(BATCH, dtype=torch.long),
                site_ids=torch.zeros(BATCH, dtype=torch.long),
            ).logits
            sex_only = model(
                pixel_values=inputs["pixel_values"], lesion_mask=inputs["lesion_mask"], sex_ids=inputs["sex_ids"]
            ).logits
        assert torch.isfinite(image_only).all()
        torch.testing.assert_close(image_only, explicit_missing)
        assert not torch.allclose(full, image_only), "metadata must change the prediction"
        assert not torch.allclose(sex_only[0], image_only[0])

    def test_given_lesion_image_skips_the_mask(self):
        model, config = self.make_model()
        inputs = self.make_inputs(config)
        inputs.pop("lesion_mask")
        inputs["lesion_pixel_values"] = torch.randn_like(inputs["pixel_values"])
        with torch.no_grad():
            outputs = model.eval()(**inputs)
        assert outputs.lesion_mask is None and torch.equal(outputs.lesion_pixel_values, inputs["lesion_pixel_values"])

    @pytest.mark.parametrize(
        "overrides",
        [{"use_lesion_branch": False}, {"use_metadata": False}, {"share_encoders": True}, {"lesion_mode": "mask"}],
    )
    def test_variants(self, overrides, tmp_path):
        model = tiny_classifier(**overrides).train()
        config = model.config
        outputs = model(**self.make_inputs(config, with_labels=True))
        outputs.loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing[:5]
        model.save_pretrained(tmp_path)
        reloaded = AutoModel.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(
                model.eval()(**self.make_inputs(config)).logits, reloaded(**self.make_inputs(config)).logits
            )
        if overrides.get("use_lesion_branch") is False:
            assert model.lesion_encoder is None and outputs.lesion_embeds is None
        if overrides.get("share_encoders"):
            assert model.lesion_branch is model.image_encoder

    def test_metadata_transformer_has_its_own_feed_forward_ratio_and_dropout(self, tmp_path):
        # The tiny preset predates the fields: `None`, so the metadata layers are sized like the fusion's, as before.
        model = tiny_classifier()
        assert model.config.metadata_ffn_ratio is None and model.config.metadata_dropout is None
        layer = model.metadata_encoder.layers[0]
        assert layer.linear1.out_features == 32 * 2 and layer.dropout.p == layer.self_attn.dropout == 0.1
        custom = tiny_classifier(metadata_ffn_ratio=4, metadata_dropout=0.0)
        layer = custom.metadata_encoder.layers[0]
        assert layer.linear1.out_features == 32 * 4 and layer.dropout.p == layer.self_attn.dropout == 0.0
        fusion_layer = custom.fusion.lesion_to_image[0]
        assert fusion_layer.mlp[0].out_features == 32 * 2 and fusion_layer.dropout.p == 0.1  # the fusion keeps its own
        custom.config.save_pretrained(tmp_path)
        reloaded = AutoConfig.from_pretrained(tmp_path)
        assert (reloaded.metadata_ffn_ratio, reloaded.metadata_dropout) == (4, 0.0)

    def test_class_weights_and_label_smoothing_change_the_loss(self):
        model, config = self.make_model()
        model.eval()
        inputs = self.make_inputs(config, with_labels=True)
        with torch.no_grad():
            base = model(**inputs).loss
            model.config.class_weights = [1.0] * (config.num_labels - 1) + [5.0]
            weighted = model(**inputs).loss
            model.config.label_smoothing = 0.0
            unsmoothed = model(**inputs).loss
        assert not torch.isclose(base, weighted) and not torch.isclose(weighted, unsmoothed)


@pytest.mark.parametrize("preset", ["segmenter.json", "skin-dualnet.json"])
def test_paper_sized_presets_fit_together(preset):
    """The paper's architecture (DenseNet-201 branches, EfficientNet-B3 segmenter) composes at its input sizes: every
    layer's shapes are propagated on the meta device, which checks them without computing (or allocating) a value."""
    config = AutoConfig.from_pretrained(PRESETS / preset)
    with torch.device("meta"):
        model = AutoModel.from_config(config).eval()
        pixel_values = torch.empty(2, 3, config.image_size, config.image_size)
        inputs = {"pixel_values": pixel_values}
        if isinstance(config, sl.SkinDualNetConfig):
            inputs["lesion_mask"] = torch.empty(2, 1, config.image_size, config.image_size)
            segmenter_size = config.segmenter_config.image_size
            segmenter_logits = model.segmenter(pixel_values=torch.empty(2, 3, segmenter_size, segmenter_size)).logits
            assert segmenter_logits.shape == (2, 1, 256, 256)
        outputs = model(**inputs, output_hidden_states=True)
    if isinstance(config, sl.SkinDualNetConfig):
        assert config.encoder_name == "densenet201" and config.segmenter_config.encoder_name == "efficientnet_b3"
        assert outputs.logits.shape == (2, 7)
        # 224 px through a stride-32 trunk: 7 x 7 tokens per branch, and DenseNet-201's 1920 channels before them.
        assert outputs.image_hidden_states[-1].shape == (2, 1920, 7, 7)
        assert outputs.fusion_hidden_states[-1].shape == (2, 49, config.fusion_dim)
    else:
        assert config.encoder_name == "efficientnet_b3" and outputs.logits.shape == (2, 1, 256, 256)


class TestClassifierPredictedMask(ModelTesterMixin):
    """The per-path checks again on the classifier's other path: no mask given, the nested segmenter predicts it
    (cleaned on the CPU, offloaded with the rest, shipped in the remote code)."""

    model_class = sl.SkinDualNet
    auto_class = AutoModelForImageClassification
    build = TestClassifier.build
    check_output_shapes = TestClassifier.check_output_shapes

    def make_inputs(self, config, with_labels=False):
        inputs = TestClassifier.make_inputs(self, config, with_labels)
        inputs.pop("lesion_mask")
        return inputs
