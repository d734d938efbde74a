"""Grad-CAM: fast path vs pytorch-grad-cam, the model's state after explaining, leaks, placement, focus, overlays."""

import gc
import threading
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import real_images, tiny_classifier

from modeling_skinlesion import SkinDualNet, SkinLesionImageProcessor, SkinLesionMetadataProcessor, build_lesion_image
from modeling_skinlesion.explaining_skinlesion import (
    FAST_CAM_METHODS,
    SkinDualNetGradCAM,
    heatmap_to_image,
    lesion_focus,
    resize_cams,
    resolve_cam_sites,
)
from modeling_skinlesion.grad_cam_backend import LIBRARY_CAM_METHODS, SkinDualNetLibraryCAM, get_explainer
from modeling_skinlesion.pipeline_skinlesion import heatmap_overlay, mask_overlay


def real_inputs(size: int, model: SkinDualNet, count: int = 3) -> dict[str, torch.Tensor]:
    """Real images (HAM10000 first, then ISIC 2017), pre-processed, with real-looking metadata (one record empty) and
    a fixed lesion mask (the centre), so the explanations under test do not also run the segmenter."""
    processor = SkinLesionImageProcessor(size=size)
    records = [{"age": 45, "sex": "male", "localization": "back"}, {"age": 70, "sex": "female"}, None][:count]
    metadata = SkinLesionMetadataProcessor.from_config(model.config)(records)
    mask = torch.zeros(count, 1, size, size)
    mask[..., size // 4 : 3 * size // 4, size // 8 : 5 * size // 8] = 1
    pixel_values = processor([str(p) for p in real_images(count)])["pixel_values"]
    return {"pixel_values": pixel_values, "lesion_mask": mask, **metadata}


def hook_counts(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def model_state(model: torch.nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "inplace": [getattr(m, "inplace", None) for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "hooks": hook_counts(model),
        "global_hooks": len(torch.nn.modules.module._global_forward_hooks),
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_same_state(before: dict, after: dict) -> None:
    for key in ("training", "inplace", "requires_grad", "hooks", "global_hooks", "grad_enabled"):
        assert before[key] == after[key], key
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


# --------------------------------------------------------------------------------------------------------------------
# Fast path == pytorch-grad-cam
# --------------------------------------------------------------------------------------------------------------------
# Every fast method once; two encoders and one shared encoder alternate, and so do the explained classes.
CAM_CASES = [
    ("gradcam", False, None),
    ("gradcam++", True, "mel"),
    ("hirescam", False, 2),
    ("xgradcam", True, None),
    ("layercam", False, "mel"),
    ("gradcamelementwise", True, 2),
]


@pytest.mark.parametrize(("method", "share_encoders", "target"), CAM_CASES)
def test_fast_path_matches_pytorch_grad_cam_on_both_branches(data_root, method, share_encoders, target):
    """Each fast method against the library's, on both branches, with two encoders and with one shared encoder (whose
    layer runs twice per forward), for the predicted class and for named ones."""
    assert {case[0] for case in CAM_CASES} == set(FAST_CAM_METHODS)
    # 128 px gives 4x4 maps at the stride-32 layer, so the comparison covers more than corner cells.
    model = tiny_classifier(image_size=128, share_encoders=share_encoders)
    inputs = real_inputs(128, model, count=2)
    fast = SkinDualNetGradCAM(method)(model, target_class=target, **inputs)
    library = SkinDualNetLibraryCAM(method)(model, target_class=target, **inputs)
    assert fast.target_classes == library.target_classes
    assert set(fast.heatmaps) == set(library.heatmaps) == {"image", "lesion"}
    for branch, maps in fast.heatmaps.items():
        assert maps.shape == (2, 4, 4)
        ours = resize_cams(maps, (128, 128))  # pytorch-grad-cam's maps are at the input size
        theirs = library.heatmaps[branch]
        assert theirs.shape == (2, 128, 128)
        # Heatmaps are normalised to [0, 1]: a wrong layer, branch or class differs by 0.1-1; two correct paths
        # differ by float rounding (up to ~2e-4 since the attention runs scaled_dot_product_attention).
        assert (ours - theirs).abs().max() < 1e-3, branch
        # Random weights give some all-zero maps (every weighted sum negative); at least one must be a real one.
        assert (theirs.flatten(1).amax(1) > 0.99).any(), branch


def test_default_layer_is_the_last_timm_feature_info_module(data_root):
    """No table of layer names: timm's metadata names the default layer (`layer4` of the tiny ResNet, `blocks.4` of
    the tiny EfficientNet; `blocks.6` of the shipped EfficientNet-Lite0 checkpoint, as before the table went)."""
    for encoder, layer in (("test_resnet", "layer4"), ("test_efficientnet", "blocks.4")):
        model = tiny_classifier(encoder_name=encoder)
        assert model.image_encoder.trunk.feature_info[-1]["module"] == layer
        inputs = real_inputs(64, model, count=2)
        default = SkinDualNetGradCAM()(model, **inputs).heatmaps
        named = SkinDualNetGradCAM(layer=layer)(model, **inputs).heatmaps
        for branch in ("image", "lesion"):
            assert torch.equal(default[branch], named[branch]), (encoder, branch)
    # Another layer gives another map, so the equality above says which layer ran.
    assert not torch.equal(SkinDualNetGradCAM(layer="bn2")(model, **inputs).heatmaps["image"], default["image"])


def test_fast_path_explains_predicted_class_by_default_and_named_classes(data_root):
    model = tiny_classifier()
    inputs = real_inputs(64, model)
    explanation = SkinDualNetGradCAM()(model, **inputs)
    with torch.inference_mode():
        logits = model(**inputs).logits
    assert explanation.target_classes == logits.argmax(-1).tolist()
    assert torch.allclose(explanation.outputs.logits, logits, atol=1e-5)
    named = SkinDualNetGradCAM()(model, target_class=["nv", 0, None], **inputs)
    assert named.target_classes == [5, 0, explanation.target_classes[2]]
    for maps in named.heatmaps.values():
        assert maps.min() >= 0 and maps.max() <= 1


def test_fast_path_computes_no_gradient_above_the_hooked_layers(data_root):
    model = tiny_classifier()
    inputs = real_inputs(64, model)
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = output.requires_grad

        return hook

    handles = [
        model.image_encoder.trunk.conv1.register_forward_hook(record("image stem")),
        model.lesion_encoder.trunk.layer3.register_forward_hook(record("lesion layer3")),
        model.image_encoder.projection.register_forward_hook(record("image projection")),
        model.classifier.register_forward_hook(record("classifier")),
    ]
    try:
        SkinDualNetGradCAM()(model, **inputs)
    finally:
        for handle in handles:
            handle.remove()
    # Autograd records nothing above the Grad-CAM layer, and everything after it.
    assert seen == {"image stem": False, "lesion layer3": False, "image projection": True, "classifier": True}
    assert all(p.grad is None for p in model.parameters())


def test_fast_path_works_inside_inference_mode_and_with_frozen_parameters(data_root):
    model = tiny_classifier()
    inputs = real_inputs(64, model)
    reference = SkinDualNetGradCAM()(model, **inputs).heatmaps
    model.requires_grad_(False)
    with torch.inference_mode():
        frozen = SkinDualNetGradCAM()(model, **inputs).heatmaps
    assert torch.is_grad_enabled()
    for branch in reference:
        assert torch.allclose(reference[branch], frozen[branch], atol=1e-6)
    assert not any(p.requires_grad for p in model.parameters())


def test_single_branch_model_has_one_heatmap(data_root):
    model = tiny_classifier(use_lesion_branch=False, use_metadata=False)
    inputs = real_inputs(64, model)
    fast = SkinDualNetGradCAM()(model, **inputs)
    library = SkinDualNetLibraryCAM()(model, **inputs)
    assert set(fast.heatmaps) == set(library.heatmaps) == {"image"}
    assert (resize_cams(fast.heatmaps["image"], (64, 64)) - library.heatmaps["image"]).abs().max() < 1e-4


# --------------------------------------------------------------------------------------------------------------------
# The model as it was found
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("explainer", [SkinDualNetGradCAM(), SkinDualNetLibraryCAM("gradcam++")], ids=["fast", "lib"])
def test_explaining_leaves_the_model_as_it_found_it(data_root, explainer):
    model = tiny_classifier()
    inputs = real_inputs(64, model)
    # An unusual state: training mode except the classifier, a frozen image trunk, a pending gradient.
    model.train()
    model.classifier.eval()
    model.image_encoder.trunk.requires_grad_(False)
    model.fusion.image_norm.weight.grad = torch.full_like(model.fusion.image_norm.weight, 0.5)
    before = model_state(model)
    assert any(before["inplace"])  # the trunks' ReLUs are in-place: the library path must switch them off
    explanation = explainer(model, **inputs)
    assert_same_state(before, model_state(model))
    # Explanations run in eval mode whatever the model's mode: dropout did not touch them.
    model.eval()
    again = explainer(model, **inputs)
    for branch in explanation.heatmaps:
        assert torch.allclose(explanation.heatmaps[branch], again.heatmaps[branch], atol=1e-6)


def test_an_error_inside_the_explanation_leaves_no_hook_or_mode_behind(data_root):
    model = tiny_classifier()
    inputs = real_inputs(64, model)
    model.train()
    before = model_state(model)
    with pytest.raises(ValueError, match="`age` has batch size"):
        SkinDualNetGradCAM()(model, **{**inputs, "age": torch.tensor([40.0])})
    assert_same_state(before, model_state(model))


def test_many_explanations_leak_neither_hooks_nor_memory(data_root):
    model = tiny_classifier()
    inputs = real_inputs(64, model)
    explainer = SkinDualNetGradCAM()
    for _ in range(3):
        explainer(model, **inputs)

    def live_tensors() -> int:
        return sum(issubclass(type(obj), torch.Tensor) for obj in gc.get_objects())  # type(): no attribute lookups

    gc.collect()
    objects, tensors = len(gc.get_objects()), live_tensors()
    tracemalloc.start()
    try:
        traced = tracemalloc.get_traced_memory()[0]
        for _ in range(10):
            explainer(model, **inputs)
        gc.collect()
        traced_growth = tracemalloc.get_traced_memory()[0] - traced
    finally:
        tracemalloc.stop()
    gc.collect()
    assert hook_counts(model) == 0
    # A leaked activation, gradient or graph leaves a tensor alive per call; a leaked hook closure or handle adds
    # objects and memory per call.
    assert live_tensors() == tensors
    assert len(gc.get_objects()) - objects < 10
    assert traced_growth < 64 * 1024


def test_library_path_leaks_no_hooks_over_repeated_calls(data_root):
    model = tiny_classifier()
    inputs = real_inputs(64, model, count=1)
    explainer = SkinDualNetLibraryCAM("gradcam")
    explainer(model, **inputs)
    gc.collect()
    objects = len(gc.get_objects())
    for _ in range(3):
        explainer(model, **inputs)
    gc.collect()
    assert hook_counts(model) == 0
    assert len(gc.get_objects()) - objects < 10


def test_plain_forwards_in_another_thread_are_not_hooked(data_root):
    model = tiny_classifier()
    inputs = real_inputs(64, model)
    with torch.inference_mode():
        reference = model(**inputs).logits
    expected = SkinDualNetGradCAM()(model, **inputs).heatmaps
    stop, mismatches = threading.Event(), []

    def predict_until_stopped():
        while not stop.is_set():
            with torch.inference_mode():
                if not torch.allclose(model(**inputs).logits, reference, atol=1e-5):
                    mismatches.append(1)

    worker = threading.Thread(target=predict_until_stopped)
    worker.start()
    try:
        for _ in range(5):
            heatmaps = SkinDualNetGradCAM()(model, **inputs).heatmaps
            for branch in expected:
                assert torch.allclose(heatmaps[branch], expected[branch], atol=1e-5)
    finally:
        stop.set()
        worker.join()
    assert not mismatches


# --------------------------------------------------------------------------------------------------------------------
# Library methods and choices
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(LIBRARY_CAM_METHODS))
def test_every_library_method_runs_on_both_branches(data_root, method):
    model = tiny_classifier()
    inputs = {key: value[:1] for key, value in real_inputs(64, model).items()}
    before = model_state(model)
    explanation = SkinDualNetLibraryCAM(method)(model, target_class="bcc", **inputs)
    assert explanation.target_classes == [1]
    for branch in ("image", "lesion"):
        maps = explanation.heatmaps[branch]
        assert maps.shape == (1, 64, 64) and torch.isfinite(maps).all()
        assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert_same_state(before, model_state(model))


def test_unknown_method_and_class_names_list_the_valid_ones(data_root):
    model = tiny_classifier()
    inputs = real_inputs(64, model)
    with pytest.raises(ValueError, match="scorecam") as error:
        SkinDualNetLibraryCAM("gradcam+++")
    assert "eigencam" in str(error.value)
    with pytest.raises(ValueError, match="choose one of"):
        SkinDualNetGradCAM("eigencam")
    with pytest.raises(ValueError, match="backend='library'"):
        get_explainer("scorecam", backend="fast")
    assert isinstance(get_explainer("scorecam"), SkinDualNetLibraryCAM)
    assert isinstance(get_explainer("gradcam"), SkinDualNetGradCAM)
    assert isinstance(get_explainer("gradcam", backend="library"), SkinDualNetLibraryCAM)
    with pytest.raises(ValueError, match=r"Unknown `target_class` 'melanoma'; the labels are \['akiec'"):
        SkinDualNetGradCAM()(model, target_class="melanoma", **inputs)
    with pytest.raises(ValueError, match="out of range"):
        SkinDualNetGradCAM()(model, target_class=7, **inputs)
    with pytest.raises(ValueError, match="one per image"):
        SkinDualNetGradCAM()(model, target_class=["mel", "nv"], **inputs)
    with pytest.raises(ValueError, match="not a module of the image encoder's trunk"):
        SkinDualNetGradCAM(layer="layer9")(model, **inputs)
    with pytest.raises(ValueError, match="must be a SkinDualNet"):
        SkinDualNetGradCAM()(model.segmenter, **inputs)


def test_cam_sites_follow_the_config_and_shared_encoders():
    model = tiny_classifier()
    sites = resolve_cam_sites(model)
    assert sites["image"].layer is model.image_encoder.trunk.layer4
    assert sites["lesion"].layer is model.lesion_encoder.trunk.layer4
    configured = resolve_cam_sites(tiny_classifier(gradcam_target_layer="layer3"))
    assert configured["image"].layer is configured["image"].encoder.trunk.layer3
    shared = resolve_cam_sites(tiny_classifier(share_encoders=True))
    assert shared["image"].layer is shared["lesion"].layer is shared["image"].encoder.trunk.layer4


# --------------------------------------------------------------------------------------------------------------------
# Placement, focus, overlays
# --------------------------------------------------------------------------------------------------------------------
def test_lesion_heatmap_goes_back_where_the_lesion_image_came_from():
    # A linear ramp survives bilinear resampling exactly, so cutting the lesion image out of the box and placing it
    # back must reproduce the ramp inside the box, to float precision, if the geometry is right.
    size = 64
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    ramp = (xs + 2 * ys)[None, None].expand(1, 3, size, size).contiguous()
    mask = torch.zeros(1, 1, size, size)
    mask[..., 20:37, 14:40] = 1
    lesion, boxes, empty = build_lesion_image(ramp, mask, mode="crop", margin=0.1)
    assert not empty.item()
    x0, y0, x1, y1 = boxes[0].tolist()
    assert 0 < x0 < x1 < size and 0 < y0 < y1 < size
    placed = heatmap_to_image(lesion[0, 0], (size, size), boxes[0], (size, size), normalize=False)
    # Compare away from the box edges, where bilinear sampling clamps at the lesion image's border.
    margin = 2 * (x1 - x0) / size + 1
    rows = slice(int(np.ceil(y0 + margin)), int(np.floor(y1 - margin)))
    cols = slice(int(np.ceil(x0 + margin)), int(np.floor(x1 - margin)))
    assert np.abs(placed[rows, cols] - ramp[0, 0].numpy()[rows, cols]).max() < 1e-3
    # Outside the box: exactly zero.
    centres = np.arange(size) + 0.5
    outside = ~(((centres >= y0) & (centres < y1))[:, None] & ((centres >= x0) & (centres < x1))[None, :])
    assert (placed[outside] == 0).all() and (placed[~outside] > 0).all()


def test_placement_scales_the_box_to_the_original_image():
    heatmap = torch.full((2, 2), 0.1)
    heatmap[0, 1] = 1.0  # top-right of the lesion image
    placed = heatmap_to_image(heatmap, (128, 256), box=[16, 8, 48, 40], input_size=(64, 64))
    assert placed.shape == (128, 256) and placed.max() == 1.0
    # Box (16, 8)-(48, 40) of a 64 x 64 input is x 64..192, y 16..80 of a 256 x 128 image.
    nonzero = np.argwhere(placed > 0)
    assert nonzero[:, 0].min() == 16 and nonzero[:, 0].max() == 79
    assert nonzero[:, 1].min() == 64 and nonzero[:, 1].max() == 191
    row, col = np.unravel_index(placed.argmax(), placed.shape)
    assert 16 <= row < 48 and 128 <= col < 192
    # A box covering the whole input is the same as no box.
    full = heatmap_to_image(heatmap, (128, 256), box=[0, 0, 64, 64], input_size=(64, 64))
    assert np.abs(full - heatmap_to_image(heatmap, (128, 256))).max() < 1e-6
    with pytest.raises(ValueError, match="input_size"):
        heatmap_to_image(heatmap, (128, 256), box=[0, 0, 64, 64])
    with pytest.raises(ValueError, match="x0 < x1"):
        heatmap_to_image(heatmap, (128, 256), box=[30, 0, 10, 64], input_size=(64, 64))


def test_lesion_focus_is_the_share_of_heatmap_mass_on_the_lesion():
    heatmap = np.zeros((10, 10), dtype=np.float32)
    heatmap[:5] = 1.0
    heatmap[5:] = 3.0
    mask = np.zeros((10, 10), dtype=bool)
    mask[5:] = True
    assert lesion_focus(heatmap, mask) == pytest.approx(0.75)
    assert lesion_focus(torch.from_numpy(heatmap), torch.from_numpy(mask)) == pytest.approx(0.75)
    assert lesion_focus(heatmap, np.zeros_like(mask)) == 0.0
    assert np.isnan(lesion_focus(np.zeros_like(heatmap), mask))
    with pytest.raises(ValueError, match="same size"):
        lesion_focus(heatmap, mask[:5])
    with pytest.raises(ValueError, match="non-negative"):
        lesion_focus(heatmap - 2, mask)


def test_lesion_focus_of_a_placed_heatmap_by_hand():
    """A 2 x 2 map, cold top row and hot bottom row, placed on a 4 x 4 image: bilinear resizing gives the rows
    0, 1/4, 3/4, 1 (pixel centres at 1/4, 3/4, 5/4, 7/4 of a cell); with the bottom half as the lesion the focus is
    (3/4 + 1) / (0 + 1/4 + 3/4 + 1) = 0.875."""
    placed = heatmap_to_image(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), (4, 4))
    np.testing.assert_allclose(placed[:, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)
    mask = np.zeros((4, 4), dtype=bool)
    mask[2:] = True
    assert lesion_focus(placed, mask) == pytest.approx(0.875)


def test_overlays_colour_hot_cold_and_the_outline():
    image = np.full((90, 120, 3), 100, dtype=np.uint8)
    heat = np.zeros((90, 120), dtype=np.float32)
    heat[:, 60:] = 1.0
    overlay = np.asarray(heatmap_overlay(image, heat, alpha=0.5))
    assert overlay.shape == (90, 120, 3)
    assert overlay[45, 100, 0] > overlay[45, 100, 2]  # hot: red
    assert overlay[45, 10, 2] > overlay[45, 10, 0]  # cold: blue
    mask = np.zeros((90, 120), dtype=bool)
    mask[20:70, 30:90] = True
    tinted = np.asarray(mask_overlay(image, mask, contour_width=2))
    assert (tinted[5, 5] == 100).all()  # background untouched
    assert tuple(tinted[20, 50]) == (255, 230, 0) and tuple(tinted[21, 50]) == (255, 230, 0)  # outline, 2 px
    assert tuple(tinted[45, 60]) != (100, 100, 100) and tuple(tinted[45, 60]) != (255, 230, 0)  # tinted inside
    assert np.asarray(mask_overlay(image, np.zeros_like(mask))).tolist() == image.tolist()
    with pytest.raises(ValueError, match="heatmap_to_image"):
        heatmap_overlay(image, heat[:10])
    with pytest.raises(ValueError, match="`mask` is"):
        mask_overlay(image, mask[:10])


def test_resized_maps_are_rescaled_to_the_unit_range():
    maps = torch.tensor([[[0.2, 0.4], [0.6, 0.8]], [[0.0, 0.0], [0.0, 0.0]]])
    resized = resize_cams(maps, (32, 32))
    assert resized.shape == (2, 32, 32)
    assert resized[0].min() == 0 and resized[0].max() == 1
    assert (resized[1] == 0).all()
    expected = F.interpolate(maps[:1, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(resized[0], (expected - expected.min()) / (expected.max() - expected.min()), atol=1e-6)
