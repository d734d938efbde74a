"""`scripts/predict.py`, run as a user runs it: on real images, a folder with bad files, metadata and class choices."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from modeling_skinlesion import SkinDualNet, SkinLesionImageProcessor, save_for_hub

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "predict.py"
LABELS = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@pytest.fixture(scope="module")
def model_folder(presets, data_root, tmp_path_factory) -> Path:
    """A tiny random-weight checkpoint whose segmenter threshold is moved so masks cover part of real images."""
    torch.manual_seed(0)
    model = SkinDualNet(AutoConfig.from_pretrained(presets / "skin-dualnet-tiny.json")).eval()
    processor = SkinLesionImageProcessor.from_model_config(model.config.segmenter_config)
    paths = sorted((data_root / "ham10000" / "images").glob("*.jpg"))[:8]
    with torch.no_grad():
        logits = model.segmenter(pixel_values=processor([str(p) for p in paths])["pixel_values"]).logits
        model.segmenter.segmentation_head.bias -= torch.quantile(logits.flatten(), 0.75)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    save_for_hub(model, folder)
    return folder


@pytest.fixture(scope="module")
def image_folder(data_root, tmp_path_factory) -> Path:
    """Three HAM10000 images, one ISIC 2017 image, a truncated JPEG, a text file and a name clash (a.jpg / a.png)."""
    folder = tmp_path_factory.mktemp("images")
    ham = sorted((data_root / "ham10000" / "images").glob("*.jpg"))[:3]
    isic = sorted((data_root / "isic2017" / "images").glob("*.jpg"))[0]
    for path in [*ham, isic]:
        shutil.copy(path, folder / path.name)
    Image.open(ham[0]).save(folder / f"{ham[0].stem}.png")
    (folder / "broken.jpg").write_bytes(isic.read_bytes()[:2000])
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def predict(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300, env=env, cwd=REPO
    )


def read_result(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


def clash_name(folder: Path) -> str:
    """The PNG whose stem clashes with a JPEG's (its output folder gets a `_png` suffix)."""
    return next(folder.glob("*.png")).name


def test_folder_is_analysed_in_batches_and_bad_files_are_skipped(model_folder, image_folder, tmp_path):
    out = tmp_path / "out"
    run = predict(image_folder, "--model", model_folder, "--out", out, "--batch-size", "2", "--age", "55")
    assert run.returncode == 0, run.stderr
    assert "broken.jpg" in run.stderr and "truncated" in run.stderr  # reported by name, with the reason
    assert "notes.txt" in run.stderr
    assert "Analysing" in run.stderr  # the progress bar
    images = sorted(p for p in image_folder.iterdir() if p.suffix in (".jpg", ".png") and p.name != "broken.jpg")
    written = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(written) == len(images) == 5
    # summary.csv: one row per analysed image, the same numbers as its result.json.
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["file"] for row in rows) == sorted(p.name for p in images)
    for row in rows:
        folder = out / (
            Path(row["file"]).stem if row["file"] != clash_name(image_folder) else f"{Path(row['file']).stem}_png"
        )
        result = read_result(folder)
        assert row["predicted_label"] == result["predicted_label"]
        for label in LABELS:
            assert float(row[f"p_{label}"]) == pytest.approx(result["probabilities"][label], abs=1e-6)
        assert row["mask_empty"] == str(result["mask_empty"]) and json.loads(row["metadata_used"]) == {"age": 55.0}
    clash = next(image_folder.glob("*.png"))  # same stem as one of the JPEGs
    assert {clash.stem, f"{clash.stem}_png"} <= set(written)
    for folder in (p for p in out.iterdir() if p.is_dir()):
        result = read_result(folder)
        source = Path(result["source"])
        with Image.open(source) as image:
            size = image.size
        assert (result["image_size"]["width"], result["image_size"]["height"]) == size
        assert list(result["probabilities"]) == LABELS
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert result["predicted_label"] == max(result["probabilities"], key=result["probabilities"].get)
        assert set(result["lesion_focus"]) == {"image", "lesion"}
        assert all(v is None or 0.0 <= v <= 1.0 for v in result["lesion_focus"].values())
        assert isinstance(result["mask_empty"], bool)
        assert result["metadata_used"] == {"age": 55.0}
        assert result["metadata_missing"] == ["sex", "site"]
        for name in ("mask", "mask_overlay", "lesion_image", "heatmap_image", "heatmap_lesion"):
            with Image.open(folder / result["files"][name]) as png:
                assert png.size == (size if name != "lesion_image" else (64, 64))


def test_single_image_with_metadata_and_target_class(model_folder, data_root, tmp_path):
    image = sorted((data_root / "isic2017" / "images").glob("*.jpg"))[1]
    out = tmp_path / "out"
    run = predict(
        image,
        "--model",
        model_folder,
        "--out",
        out,
        "--sex",
        "female",
        "--site",
        "upper limb",
        "--target-class",
        "mel",
    )
    assert run.returncode == 0, run.stderr
    result = read_result(out / image.stem)
    assert result["target_label"] == "mel"
    assert result["metadata_used"] == {"sex": "female", "site": "upper extremity"}
    assert result["metadata_missing"] == ["age"]


def test_metadata_csv_gives_each_image_its_own_record(model_folder, data_root, tmp_path):
    ham = data_root / "ham10000"
    rows = list(csv.DictReader(open(ham / "HAM10000_metadata.csv", newline="")))
    by_id = {row["image_id"]: row for row in rows}
    images = [p for p in sorted((ham / "images").glob("*.jpg"))[:40] if p.stem in by_id][:2]
    folder = tmp_path / "images"
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder / path.name)
    table = tmp_path / "metadata.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(by_id[p.stem] for p in images)
    out = tmp_path / "out"
    run = predict(folder, "--model", model_folder, "--out", out, "--metadata-csv", table, "--no-explain")
    assert run.returncode == 0, run.stderr
    for path in images:
        result = read_result(out / path.stem)
        row = by_id[path.stem]
        assert result["metadata_used"].get("age") == (float(row["age"]) if row["age"] else None)
        assert result["metadata_used"].get("sex") == (row["sex"] if row["sex"] in ("male", "female") else None)
        assert result["lesion_focus"] == {} and "heatmap_image" not in result["files"]


def test_library_backend_by_method_name(model_folder, data_root, tmp_path):
    image = sorted((data_root / "ham10000" / "images").glob("*.jpg"))[5]
    out = tmp_path / "out"
    run = predict(image, "--model", model_folder, "--out", out, "--method", "eigencam")
    assert run.returncode == 0, run.stderr
    result = read_result(out / image.stem)
    assert result["method"] == "eigencam" and result["backend"] == "SkinDualNetLibraryCAM"
    assert set(result["lesion_focus"]) == {"image", "lesion"}


def test_failures_give_clear_messages_and_exit_codes(model_folder, image_folder, tmp_path):
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(image_folder / "broken.jpg", only_bad / "broken.jpg")
    (only_bad / "empty.png").write_bytes(b"")
    run = predict(only_bad, "--model", model_folder, "--out", tmp_path / "out")
    assert run.returncode == 1
    assert "broken.jpg" in run.stderr and "empty.png" in run.stderr and "No image could be analysed" in run.stderr

    run = predict(image_folder, "--model", model_folder, "--out", tmp_path / "out2", "--target-class", "melanoma")
    assert run.returncode == 2
    assert "Unknown `target_class` 'melanoma'" in run.stderr and "'akiec'" in run.stderr

    run = predict(image_folder, "--model", tmp_path / "no-such-model", "--out", tmp_path / "out3")
    assert run.returncode == 2 and "no-such-model" in run.stderr

    run = predict(image_folder, "--model", model_folder, "--out", tmp_path / "out4", "--method", "nope")
    assert run.returncode == 2 and "invalid choice" in run.stderr and "gradcam++" in run.stderr


def test_unreachable_hub_id_fails_fast_with_one_line(tmp_path, data_root):
    """Offline, a Hub id that is not cached fails in seconds with one line naming the shipped checkpoint."""
    import time

    image = next((data_root / "ham10000" / "images").glob("*.jpg"))
    start = time.monotonic()
    run = predict(image, "--model", "org/no-such-model", "--out", tmp_path / "out")
    assert run.returncode == 2
    assert time.monotonic() - start < 60  # the import of the stack dominates; no 45 s of retries
    errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "checkpoints/skin-dualnet-small" in errors[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr
