"""scripts/push_to_hub.py: the Hub-ready folder, its model card, remote-code loading without our package, and the
upload's failure modes without a network."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PRESETS, REPO_ROOT, SCRIPTS, script_module, tiny_classifier, tiny_segmenter
from huggingface_hub import ModelCard
from isolation import run_isolated
from PIL import Image
from transformers import AutoConfig

import modeling_skinlesion as sl
from modeling_skinlesion.model_card import render_model_card

SCRIPT = SCRIPTS / "push_to_hub.py"
METRICS = {
    "task": "classification",
    "dataset": "ham10000",
    "split": "validation",
    "num_samples": 120,
    "metrics": {
        "accuracy": 0.7123,
        "balanced_accuracy": 0.5432,
        "macro_auc": 0.8765,
        "ece": 0.0456,
        "per_class_auc": {"akiec": 0.81, "mel": 0.77, "nv": None},
    },
}


def run_script(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def push_to_hub():
    """The script as a module: `main(argv)` is the command line without a new interpreter."""
    return script_module("push_to_hub.py", "push_to_hub")


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def real_image(data_root: Path) -> Path:
    return sorted((data_root / "ham10000" / "images").glob("ISIC_*.jpg"))[0]


@pytest.fixture(scope="module")
def trained_classifier(tmp_path_factory):
    """A tiny classifier saved as a training run leaves it (weights, processor), plus a metrics JSON."""
    model = tiny_classifier()
    config = model.config
    folder = tmp_path_factory.mktemp("run") / "final"
    model.save_pretrained(folder)
    sl.SkinLesionImageProcessor.from_model_config(config).save_pretrained(folder)
    metrics_file = folder.parent / "metrics.json"
    metrics_file.write_text(json.dumps(METRICS))
    return model, folder, metrics_file


@pytest.fixture(scope="module")
def exported_classifier(push_to_hub, trained_classifier, tmp_path_factory):
    model, folder, metrics_file = trained_classifier
    output = tmp_path_factory.mktemp("hub") / "skin-dualnet"
    args = [
        "--model_path", str(folder), "--output_dir", str(output), "--datasets", "HAM10000", "isic2019",
        "--metrics_file", str(metrics_file),
    ]  # fmt: skip
    assert push_to_hub.main(args) == 0
    return model, output, args


def test_export_folder_is_hub_ready(exported_classifier):
    _, output, _ = exported_classifier
    names = {p.name for p in output.iterdir()}
    # The remote code is every `*_skinlesion.py` module of the package (the naming rule of the shipped files).
    shipped = {path.name for path in (REPO_ROOT / "modeling_skinlesion").glob("*_skinlesion.py")}
    assert {"configuration_skinlesion.py", "modeling_skinlesion.py", "pipeline_skinlesion.py"} <= shipped
    assert names == shipped | {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "metrics.json",  # the --metrics-file, beside the card that tabulates it
    }
    config = json.loads((output / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_skinlesion.SkinDualNetConfig",
        "AutoModel": "modeling_skinlesion.SkinDualNet",
        "AutoModelForImageClassification": "modeling_skinlesion.SkinDualNet",
    }
    # The classifier export ships the analysis pipeline too.
    pipeline_impl = config["custom_pipelines"]["skin-lesion-analysis"]["impl"]
    assert pipeline_impl == "pipeline_skinlesion.SkinLesionAnalysisPipeline"
    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert processor["auto_map"] == {"AutoImageProcessor": "image_processing_skinlesion.SkinLesionImageProcessor"}
    assert processor["size"] == {"height": 64, "width": 64}


def test_model_card_front_matter_and_sections(exported_classifier):
    _, output, _ = exported_classifier
    card = ModelCard.load(output / "README.md")
    assert card.data.license == "cc-by-nc-4.0"
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.library_name == "transformers"
    assert {"skin-lesion", "dermoscopy", "custom_code"} <= set(card.data.tags)
    assert card.data.datasets == ["HAM10000", "ISIC-2019"]
    text = card.text
    for heading in ("Model description", "Training data", "Evaluation", "Intended use", "Limitations", "Licence"):
        assert f"## {heading}" in text
    assert "Research software, not a medical device" in text
    assert "non-commercial use only" in text
    assert "arXiv:2510.17773" in text and "tschandl2018ham10000" in text and "combalia2019bcn20000" in text
    # The metrics table comes from the metrics file.
    assert "| balanced_accuracy | 0.5432 |" in text and "| macro_auc | 0.8765 |" in text
    assert "| nv | n/a |" in text
    assert "split: validation" in text
    assert "`akiec`, `bcc`, `bkl`, `df`, `mel`, `nv`, `vasc`" in text


@pytest.mark.slow
def test_exported_classifier_loads_without_package(exported_classifier, data_root, tmp_path):
    model, output, _ = exported_classifier
    image = real_image(data_root)
    processor = sl.SkinLesionImageProcessor.from_pretrained(output)
    inputs = dict(processor(Image.open(image)))
    inputs.update(
        sl.SkinLesionMetadataProcessor.from_config(model.config)([{"age": 45, "sex": "male", "localization": "back"}])
    )
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.save(model(**inputs).logits, tmp_path / "expected.pt")
    out = run_isolated(
        f"""
        import sys
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModel

        try:
            import modeling_skinlesion
            raise SystemExit("modeling_skinlesion is importable: the isolation is broken")
        except ImportError:
            pass
        assert not any({str(REPO_ROOT)!r} == p for p in sys.path), sys.path
        model = AutoModel.from_pretrained({str(output)!r}, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained({str(output)!r}, trust_remote_code=True)
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        remote_pixels = processor(Image.open({str(image)!r}))["pixel_values"]
        torch.testing.assert_close(remote_pixels, inputs["pixel_values"], rtol=0, atol=0)
        with torch.no_grad():
            logits = model(**inputs).logits
        # Same weights and inputs; only the thread count of another process may change float summation order.
        torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), rtol=1e-5, atol=1e-6)
        print(type(model).__module__, type(model).__name__, type(processor).__name__, "identical")
        from transformers import pipeline

        analyse = pipeline("skin-lesion-analysis", model={str(output)!r}, trust_remote_code=True)
        result = analyse({str(image)!r}, metadata={{"age": 45, "sex": "male", "site": "back"}})
        assert abs(sum(result["probabilities"].values()) - 1) < 1e-4, result["probabilities"]
        assert set(result["lesion_focus"]) == {{"image", "lesion"}}, result["lesion_focus"]
        print(type(analyse).__module__, "pipeline-ok")
        """,
        cwd=tmp_path / "isolated",
    )
    pipeline_module, pipeline_verdict = out.split()[-2:]
    assert pipeline_module.startswith("transformers_modules") and pipeline_verdict == "pipeline-ok"
    module, name, processor_name, verdict = out.split()[-6:-2]
    assert module.startswith("transformers_modules") and name == "SkinDualNet"
    assert processor_name == "SkinLesionImageProcessor" and verdict == "identical"


@pytest.mark.slow
def test_exported_segmenter_loads_without_package(push_to_hub, data_root, tmp_path):
    model = tiny_segmenter(seed=1)
    config = model.config
    model.save_pretrained(tmp_path / "final")  # no processor saved: the script builds it from the config
    # The record a training run leaves next to its model: the card takes the training sets and scores from it.
    training_record = {
        "task": "segmentation",
        "best": {"metric": "dice", "value": 0.81, "epoch": 4, "validation": {"dice": 0.8123, "jaccard": 0.7012}},
        "args": {"dataset": ["isic2017", "ham10000"], "data_root": ["a", "b"]},
    }
    (tmp_path / "final" / "metrics.json").write_text(json.dumps(training_record))
    output = tmp_path / "hub"
    assert push_to_hub.main(["--model-path", str(tmp_path / "final"), "--output-dir", str(output)]) == 0
    card = ModelCard.load(output / "README.md")
    assert card.data.pipeline_tag == "image-segmentation" and card.data.license == "cc-by-nc-4.0"
    assert card.data.datasets == ["ISIC-2017", "HAM10000"]
    assert "| dice | 0.8123 |" in card.text and "best epoch: 5" in card.text
    assert "metrics.json" not in {p.name for p in output.iterdir()}
    # Scores from scripts/evaluate_model.py instead; the training sets still come from the training record.
    evaluation = {"task": "segmentation", "dataset": "isic2017", "split": "all", "num_images": 12}
    evaluation["metrics"] = {"dice": 0.7777, "jaccard": 0.6543, "num_images": 12}
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    args = [
        "--model-path",
        str(tmp_path / "final"),
        "--output-dir",
        str(output),
        "--metrics-file",
        str(tmp_path / "eval.json"),
    ]
    assert push_to_hub.main(args) == 0
    card = ModelCard.load(output / "README.md")
    assert card.data.datasets == ["ISIC-2017", "HAM10000"]
    assert (
        "| dice | 0.7777 |" in card.text and "Evaluated on dataset: isic2017; split: all; num_images: 12." in card.text
    )
    assert "| num_images |" not in card.text
    pixel_values = sl.SkinLesionImageProcessor.from_model_config(config)(Image.open(real_image(data_root)))[
        "pixel_values"
    ]
    torch.save(pixel_values, tmp_path / "pixels.pt")
    with torch.no_grad():
        torch.save(model(pixel_values=pixel_values).logits, tmp_path / "expected.pt")
    out = run_isolated(
        f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(output)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(pixel_values=torch.load({str(tmp_path / "pixels.pt")!r})).logits
        torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), rtol=1e-5, atol=1e-6)
        print(type(model).__module__, type(model).__name__)
        """,
        cwd=tmp_path / "isolated",
    )
    module, name = out.split()[-2:]
    assert module.startswith("transformers_modules") and name == "SkinLesionSegmenter"


@pytest.mark.slow
def test_push_offline_fails_clearly_and_keeps_folder(exported_classifier, tmp_path):
    """As a user meets it: a new process with HF_HUB_OFFLINE=1 in its environment."""
    _, output, args = exported_classifier
    before = folder_digest(output)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = run_script(*args, "--push", "--token", "hf_not_a_real_token", env=env)
    assert result.returncode == 2, result.stderr
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in result.stderr
    assert f"The exported folder is intact at {output}" in result.stderr
    assert folder_digest(output) == before


def test_push_to_an_unreachable_hub_fails_clearly_and_keeps_folder(
    push_to_hub, exported_classifier, monkeypatch, caplog
):
    """Online mode, but nothing answers at the endpoint (huggingface_hub's settings changed in this process)."""
    import huggingface_hub

    _, output, args = exported_classifier
    before = folder_digest(output)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    assert push_to_hub.main([*args, "--push", "--token", "hf_not_a_real_token"]) == 2
    assert "Cannot reach the Hugging Face Hub at http://127.0.0.1:9" in caplog.text
    assert f"The exported folder is intact at {output}" in caplog.text
    assert folder_digest(output) == before


@pytest.mark.slow
def test_push_without_token_says_so(trained_classifier, tmp_path):
    _, folder, _ = trained_classifier
    env = {
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path / "home"),
        "HF_TOKEN": "",
    }
    result = run_script(
        "--model_path", str(folder), "--output_dir", str(tmp_path / "hub"), "--datasets", "ham10000", "--push", env=env
    )
    assert result.returncode == 1 and "no Hub token" in result.stderr
    assert (tmp_path / "hub" / "model.safetensors").is_file()


def test_bad_invocations_exit_non_zero(push_to_hub, trained_classifier, tmp_path, caplog):
    _, folder, _ = trained_classifier
    assert push_to_hub.main(["--model_path", str(folder), "--output_dir", str(tmp_path / "a")]) == 1
    assert "--datasets" in caplog.text
    cluttered = tmp_path / "cluttered"
    cluttered.mkdir()
    (cluttered / "notes.txt").write_text("keep me")
    args = ["--model_path", str(folder), "--output_dir", str(cluttered), "--datasets", "ham10000"]
    assert push_to_hub.main(args) == 1
    assert "--overwrite" in caplog.text
    assert [p.name for p in cluttered.iterdir()] == ["notes.txt"]
    args = ["--model_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "b"), "--datasets", "ham10000"]
    assert push_to_hub.main(args) == 1
    assert not (tmp_path / "b").exists()


def test_card_licence_follows_training_data():
    config = AutoConfig.from_pretrained(PRESETS / "skin-dualnet-tiny.json")
    own_data = render_model_card(config, datasets=["St Elsewhere dermatology 2024"])
    assert own_data.data.license == "other"
    assert "user-supplied data" in own_data.text and "non-commercial use only" not in own_data.text
    fine_tuned = render_model_card(
        config, datasets=["ISIC 2018", "clinic"], base_model="org/skin-dualnet", repo_id="clinic/skin-dualnet-ft"
    )
    assert fine_tuned.data.license == "cc-by-nc-4.0" and fine_tuned.data.base_model == "org/skin-dualnet"
    assert fine_tuned.data.datasets == ["ISIC-2018", "clinic"]
    assert "No evaluation results were supplied" in fine_tuned.text
    assert 'AutoModel.from_pretrained("clinic/skin-dualnet-ft", trust_remote_code=True)' in fine_tuned.text
    with pytest.raises(ValueError, match="model_type"):
        render_model_card(AutoConfig.for_model("vit"))
