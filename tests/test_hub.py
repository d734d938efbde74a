"""The user's exact calls: `AutoModel.from_pretrained("org/skin-dualnet", trust_remote_code=True)` from a Hub cache,
and `pipeline("image-classification", ...)`, in processes that cannot import this package."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_classifier
from isolation import run_isolated
from PIL import Image
from transformers import pipeline

import modeling_skinlesion as sl

REPO_ID = "org/skin-dualnet"


def build_hub_cache(folder: Path, cache: Path, repo_id: str) -> str:
    """Lay `folder` out as huggingface_hub leaves a downloaded repo: blobs named by content hash, a ref, and a
    snapshot of relative symlinks. Returns the commit hash."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    files = sorted(p for p in folder.iterdir() if p.is_file())
    commit = hashlib.sha1("".join(p.name for p in files).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in files:
        data = path.read_bytes()
        # LFS files (weights) are stored under their sha256, regular files under their git blob sha1.
        if path.suffix == ".safetensors":
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", snapshot / path.name)
    (repo / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture(scope="module")
def saved_model(saved_tiny_classifier):
    """The model (the tiny preset, seed 0) and the folder `save_for_hub` wrote for it."""
    return tiny_classifier(), saved_tiny_classifier


def lesion_photo() -> Image.Image:
    rng = np.random.default_rng(0)
    array = np.full((150, 200, 3), (200, 160, 140), dtype=np.uint8)
    array[50:100, 70:130] = (90, 50, 40)
    return Image.fromarray(np.clip(array + rng.normal(0, 8, array.shape), 0, 255).astype(np.uint8))


@pytest.mark.slow
def test_from_pretrained_repo_id_from_hub_cache_without_package(saved_model, tmp_path):
    model, folder = saved_model
    cache = tmp_path / "hub"
    build_hub_cache(folder, cache, REPO_ID)
    inputs = {
        "pixel_values": torch.randn(2, 3, 64, 64),
        "age": torch.tensor([60.0, float("nan")]),
        "sex_ids": torch.tensor([1, 2]),
        "site_ids": torch.tensor([2, 0]),
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.save(model(**inputs).logits, tmp_path / "expected.pt")
    out = run_isolated(
        f"""
        import torch
        from transformers import AutoImageProcessor, AutoModel
        model = AutoModel.from_pretrained({REPO_ID!r}, trust_remote_code=True).eval()
        print(type(model).__module__, type(model).__name__)
        processor = AutoImageProcessor.from_pretrained({REPO_ID!r}, trust_remote_code=True)
        print(type(processor).__name__)
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            logits = model(**inputs).logits
        torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), rtol=0, atol=0)
        print("identical")
        """,
        cwd=tmp_path / "run",
        env={"HF_HUB_CACHE": str(cache)},
    )
    module, name, processor, verdict = out.split()[-4:]
    assert module.startswith("transformers_modules") and name == "SkinDualNet"
    assert processor == "SkinLesionImageProcessor" and verdict == "identical"


def test_image_classification_pipeline_on_saved_folder(saved_model):
    model, folder = saved_model
    classify = pipeline("image-classification", model=str(folder), trust_remote_code=True, top_k=7)
    predictions = classify(lesion_photo())
    assert {p["label"] for p in predictions} == set(model.config.id2label.values())
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)
    # Same numbers as running the processor and model by hand.
    inputs = sl.SkinLesionImageProcessor.from_pretrained(folder)(lesion_photo())
    with torch.no_grad():
        probabilities = model(**inputs).logits.softmax(-1)[0]
    by_label = {p["label"]: p["score"] for p in predictions}
    for index, label in model.config.id2label.items():
        assert by_label[label] == pytest.approx(probabilities[index].item(), abs=1e-5)


@pytest.mark.slow
def test_image_classification_pipeline_without_package(saved_model, tmp_path):
    _, folder = saved_model
    image_path = tmp_path / "lesion.png"
    lesion_photo().save(image_path)
    out = run_isolated(
        f"""
        from transformers import pipeline
        classify = pipeline("image-classification", model={str(folder)!r}, trust_remote_code=True)
        result = classify({str(image_path)!r})
        print(len(result), result[0]["label"])
        """,
        cwd=tmp_path / "run",
    )
    count, label = out.split()[-2:]
    assert int(count) == 5 and label in {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
