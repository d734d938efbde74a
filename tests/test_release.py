"""The release checkpoint shipped in the repository (`checkpoints/skin-dualnet-small`): it loads without the package,
gives finite calibrated probabilities, carries its fitted temperature, its card states exactly its metrics file, both
pipelines agree on it, and it stays within the size budget."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import CHECKPOINT, REPO_ROOT, SPACE
from isolation import run_isolated
from safetensors import safe_open
from transformers import AutoModel, pipeline

from modeling_skinlesion.model_card import _format

EXAMPLES = sorted((SPACE / "examples").glob("*.jpg"))


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((CHECKPOINT / "metrics.json").read_text())


def test_checkpoint_is_complete_and_within_30_mb():
    names = {path.name for path in CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "metrics.json"} <= names
    assert {"configuration_skinlesion.py", "modeling_skinlesion.py", "image_processing_skinlesion.py"} <= names
    size = sum(path.stat().st_size for path in CHECKPOINT.iterdir() if path.is_file())
    assert size <= 30 * 2**20, size
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert {"AutoConfig", "AutoModel"} <= set(config["auto_map"])
    assert "skin-lesion-analysis" in config["custom_pipelines"]


def test_weights_are_stored_in_half_precision_and_load_as_float32():
    with safe_open(str(CHECKPOINT / "model.safetensors"), framework="pt") as handle:
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}
    assert "F16" in dtypes and "F32" not in dtypes
    model = AutoModel.from_pretrained(CHECKPOINT, trust_remote_code=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_config_carries_the_fitted_temperature(metrics):
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["temperature"] == pytest.approx(metrics["calibration"]["temperature"])
    assert config["temperature"] != 1.0
    assert config["temperature"] == pytest.approx(metrics["calibration"]["validation"]["temperature"])


def test_loads_without_the_package_and_gives_probabilities(tmp_path):
    output = run_isolated(
        f"""
        import json
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModel

        model = AutoModel.from_pretrained({str(CHECKPOINT)!r}, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained({str(CHECKPOINT)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        images = [Image.open(path) for path in {[str(p) for p in EXAMPLES]!r}]
        with torch.inference_mode():
            probabilities = model(**processor(images)).logits.softmax(-1)
        print(json.dumps(probabilities.tolist()))
        """,
        cwd=tmp_path,
    )
    probabilities = np.array(json.loads(output.strip().splitlines()[-1]))
    assert probabilities.shape == (len(EXAMPLES), 7)
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)


def test_both_pipelines_give_the_same_probabilities():
    classify = pipeline("image-classification", model=str(CHECKPOINT), trust_remote_code=True)
    analyse = pipeline("skin-lesion-analysis", model=str(CHECKPOINT), trust_remote_code=True)
    for path in EXAMPLES:
        scores = {row["label"]: row["score"] for row in classify(str(path), top_k=7)}
        result = analyse(str(path), explain=False)
        assert set(scores) == set(result["probabilities"])
        for label, probability in result["probabilities"].items():
            assert scores[label] == pytest.approx(probability, abs=1e-5), (path.name, label)


def test_model_card_states_the_metrics_file(metrics):
    card = (CHECKPOINT / "README.md").read_text()
    assert "not a medical device" in card and "license: cc-by-nc-4.0" in card
    for key in ("balanced_accuracy", "macro_auc", "accuracy", "ece"):
        interval = metrics["intervals_95"].get(key)
        shown = f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "–"
        assert f"| {key} | {_format(metrics[key])} | {shown} |" in card, key
    for name, row in metrics["per_class"].items():
        assert (
            f"| {name} | {row['support']} | {_format(row['sensitivity'])} | {_format(row['specificity'])} | "
            f"{_format(row['auc'])} |" in card
        ), name
    assert f"sensitivity {_format(metrics['melanoma_sensitivity'])}" in card
    calibration = metrics["calibration"]
    assert f"ECE on the test split: {_format(calibration['test_ece_before'])} before" in card
    assert f"{_format(calibration['test_ece_after'])} after" in card
    for field, groups in metrics["subgroups"].items():
        for group, row in groups.items():
            prefix = f"| {field} | {group} | {row['images']} | "
            expected = "too small to judge" if row.get("too_small") else _format(row["accuracy"])
            assert prefix + expected in card, (field, group)
    for name, row in metrics["segmenter"].items():
        assert f"| {name} | {row['num_samples']} | {_format(row['dice'])} |" in card, name
    for stage in metrics["recipe"]:
        assert f"({stage['wall_time_s']} s)" in card
    assert metrics["test_images"] > 0 and math.isfinite(metrics["balanced_accuracy"])


def test_shipped_remote_code_is_the_package_code():
    """The checkpoint's remote-code files are this package's modules (refresh them with scripts/push_to_hub.py)."""
    package = REPO_ROOT / "modeling_skinlesion"
    for path in CHECKPOINT.glob("*.py"):
        assert path.read_text() == (package / path.name).read_text(), path.name
