"""`scripts/predict.py`: a folder run as a user runs it (batches, bad files, summary.csv written as results arrive, an
interrupted run keeping its rows), then the options through `main(argv)` in this process: metadata, class choice,
CAM backend, a segmenter checkpoint alone, and the failures' messages and exit codes."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LABELS, REPO_ROOT, SCRIPTS, real_images, script_module, tiny_classifier, tiny_segmenter
from PIL import Image

from modeling_skinlesion import SkinLesionImageProcessor, save_for_hub

SCRIPT = SCRIPTS / "predict.py"


@pytest.fixture(scope="module")
def predict_script():
    return script_module("predict.py", "predict_script")


def shift_mask_head(head: torch.nn.Conv2d, logits: torch.Tensor, quantile: float = 0.75) -> None:
    """Move the segmentation head's bias so that about 1 - `quantile` of the pixels are lesion on these logits."""
    with torch.no_grad():
        head.bias -= torch.quantile(logits.flatten(), quantile)


@pytest.fixture(scope="module")
def model_folder(data_root, tmp_path_factory) -> Path:
    """A tiny random-weight classifier whose segmenter threshold is moved so masks cover part of real images."""
    model = tiny_classifier()
    processor = SkinLesionImageProcessor.from_model_config(model.config.segmenter_config)
    with torch.no_grad():
        logits = model.segmenter(pixel_values=processor([str(p) for p in real_images(8)])["pixel_values"]).logits
    shift_mask_head(model.segmenter.segmentation_head, logits)
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


def predict(*args: str | Path, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """`python scripts/predict.py ARGS` in a fresh process; with `popen=True`, the running process."""
    command = [sys.executable, str(SCRIPT), *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if popen.get("popen"):
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)


def read_result(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


def read_summary(out: Path) -> list[dict[str, str]]:
    with (out / "summary.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def check_row_matches_result(row: dict[str, str], result: dict) -> None:
    assert row["predicted_label"] == result["predicted_label"]
    for label in LABELS:
        assert float(row[f"p_{label}"]) == pytest.approx(result["probabilities"][label], abs=1e-6)
    assert row["mask_empty"] == str(result["mask_empty"])
    assert json.loads(row["metadata_used"]) == result["metadata_used"]


def test_folder_is_analysed_in_batches_and_bad_files_are_skipped(
    predict_script, model_folder, image_folder, tmp_path, capsys, caplog
):
    out = tmp_path / "out"
    argv = [str(image_folder), "--model", str(model_folder), "--out", str(out), "--batch-size", "2", "--age", "55"]
    assert predict_script.main(argv) == 0
    printed = capsys.readouterr().err + caplog.text
    assert "broken.jpg" in printed and "truncated" in printed  # reported by name, with the reason
    assert "notes.txt" in printed
    assert "Analysing" in printed  # the progress bar
    images = sorted(p for p in image_folder.iterdir() if p.suffix in (".jpg", ".png") and p.name != "broken.jpg")
    written = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(written) == len(images) == 5
    clash = next(image_folder.glob("*.png"))  # same stem as one of the JPEGs: its folder gets a `_png` suffix
    assert {clash.stem, f"{clash.stem}_png"} <= set(written)
    # summary.csv: one row per analysed image, the same numbers as its result.json.
    rows = read_summary(out)
    assert sorted(row["file"] for row in rows) == sorted(p.name for p in images)
    for row in rows:
        stem = Path(row["file"]).stem
        check_row_matches_result(row, read_result(out / (f"{stem}_png" if row["file"] == clash.name else stem)))
    for folder in (p for p in out.iterdir() if p.is_dir()):
        result = read_result(folder)
        with Image.open(result["source"]) as image:
            size = image.size
        assert (result["image_size"]["width"], result["image_size"]["height"]) == size
        assert list(result["probabilities"]) == LABELS
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert result["predicted_label"] == max(result["probabilities"], key=result["probabilities"].get)
        assert set(result["lesion_focus"]) == {"image", "lesion"}
        assert result["metadata_used"] == {"age": 55.0} and result["metadata_missing"] == ["sex", "site"]
        for name in ("mask", "mask_overlay", "lesion_image", "heatmap_image", "heatmap_lesion"):
            with Image.open(folder / result["files"][name]) as png:
                assert png.size == (size if name != "lesion_image" else (64, 64))  # lesion image: the input size


def test_interrupted_run_keeps_the_rows_it_wrote(model_folder, tmp_path):
    """summary.csv rows reach the disk as each image is done: read while the run is still going, then the run is
    killed (SIGKILL, no clean-up) and every row it left matches a complete result.json."""
    folder = tmp_path / "images"
    folder.mkdir()
    sources = real_images(2)
    for index in range(24):
        shutil.copy(sources[index % 2], folder / f"copy{index:02d}.jpg")
    out = tmp_path / "out"
    process = predict(folder, "--model", model_folder, "--out", out, "--batch-size", "1", popen=True)
    seen: list[dict[str, str]] = []
    deadline = time.monotonic() + 300
    while not seen and time.monotonic() < deadline and process.poll() is None:
        if (out / "summary.csv").is_file():
            seen = read_summary(out)
        time.sleep(0.005)
    running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert seen and running, f"no row was seen while the run was going: {stderr.decode()[-2000:]}"
    rows = read_summary(out)
    assert 1 <= len(seen) <= len(rows) < 24
    for row in rows:
        check_row_matches_result(row, read_result(out / Path(row["file"]).stem))


def test_single_image_with_metadata_and_target_class(predict_script, model_folder, data_root, tmp_path):
    image = sorted((data_root / "isic2017" / "images").glob("*.jpg"))[1]
    out = tmp_path / "out"
    argv = [str(image), "--model", str(model_folder), "--out", str(out), "--sex", "female", "--site", "upper limb"]
    assert predict_script.main([*argv, "--target-class", "mel"]) == 0
    result = read_result(out / image.stem)
    assert result["target_label"] == "mel"
    assert result["metadata_used"] == {"sex": "female", "site": "upper extremity"}
    assert result["metadata_missing"] == ["age"]
    assert len(read_summary(out)) == 1


def test_metadata_csv_gives_each_image_its_own_record(predict_script, model_folder, data_root, tmp_path):
    ham = data_root / "ham10000"
    with (ham / "HAM10000_metadata.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
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
    argv = [str(folder), "--model", str(model_folder), "--out", str(out), "--metadata-csv", str(table)]
    assert predict_script.main([*argv, "--no-explain"]) == 0
    for path in images:
        result = read_result(out / path.stem)
        row = by_id[path.stem]
        assert result["metadata_used"].get("age") == (float(row["age"]) if row["age"] else None)
        assert result["metadata_used"].get("sex") == (row["sex"] if row["sex"] in ("male", "female") else None)
        assert result["lesion_focus"] == {} and "heatmap_image" not in result["files"]


def test_library_backend_by_method_name(predict_script, model_folder, tmp_path):
    image = real_images(1)[0]
    out = tmp_path / "out"
    assert (
        predict_script.main([str(image), "--model", str(model_folder), "--out", str(out), "--method", "eigencam"]) == 0
    )
    result = read_result(out / image.stem)
    assert result["method"] == "eigencam" and result["backend"] == "SkinDualNetLibraryCAM"
    assert set(result["lesion_focus"]) == {"image", "lesion"}


def test_cam_methods_are_the_librarys(predict_script):
    """--method's choices are written out (so --help needs no torch); they must be the package's methods."""
    from modeling_skinlesion.explaining_skinlesion import FAST_CAM_METHODS
    from modeling_skinlesion.grad_cam_backend import LIBRARY_CAM_METHODS

    assert predict_script.CAM_METHODS == tuple(LIBRARY_CAM_METHODS)
    assert predict_script.CAM_METHODS[: len(FAST_CAM_METHODS)] == FAST_CAM_METHODS


def saved_segmenter(folder: Path, bias: float | None) -> Path:
    """conftest's tiny segmenter saved with save_pretrained (no processor: the script builds it from the config), its
    head's bias set to `bias` (+/-100 saturates the mask) or, for None, moved so masks cover part of real images."""
    model = tiny_segmenter()
    with torch.no_grad():
        if bias is None:
            processor = SkinLesionImageProcessor.from_model_config(model.config)
            logits = model(pixel_values=processor([str(p) for p in real_images(8)])["pixel_values"]).logits
            shift_mask_head(model.segmentation_head, logits, quantile=0.6)
        else:
            model.segmentation_head.weight.zero_()
            model.segmentation_head.bias.fill_(bias)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("bias", [100.0, -100.0, None], ids=["all-lesion", "no-lesion", "partial"])
def test_segmenter_alone_writes_masks_and_summary(predict_script, data_root, tmp_path, caplog, bias):
    images = real_images(4)  # two HAM10000 and two ISIC 2017 images, of different sizes
    folder = tmp_path / "images"
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder / path.name)
    model = saved_segmenter(tmp_path / "segmenter", bias)
    out = tmp_path / "out"
    argv = [str(folder), "--model", str(model), "--out", str(out), "--batch-size", "3", "--age", "50"]
    assert predict_script.main(argv) == 0
    assert "--age ignored" in caplog.text
    rows = {row["file"]: row for row in read_summary(out)}
    assert sorted(rows) == sorted(p.name for p in images)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{p.stem}_segmentation.png" for p in images] + ["summary.csv"]
    )
    fractions = []
    for path in images:
        row = rows[path.name]
        with Image.open(path) as image, Image.open(out / row["mask_file"]) as png:
            assert png.size == image.size == (int(row["width"]), int(row["height"])) and png.mode == "L"
            mask = np.asarray(png)
        assert set(np.unique(mask)) <= {0, 255}
        fraction = (mask == 255).mean()
        assert float(row["mask_fraction"]) == pytest.approx(fraction, abs=1e-6)
        assert row["mask_empty"] == str(fraction == 0)
        fractions.append(fraction)
    if bias == 100.0:
        assert fractions == [1.0] * 4
    elif bias == -100.0:
        assert fractions == [0.0] * 4
    else:
        assert all(0.0 < f < 1.0 for f in fractions), fractions


def test_failures_give_clear_messages_and_exit_codes(predict_script, model_folder, image_folder, tmp_path, caplog):
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(image_folder / "broken.jpg", only_bad / "broken.jpg")
    (only_bad / "empty.png").write_bytes(b"")
    assert predict_script.main([str(only_bad), "--model", str(model_folder), "--out", str(tmp_path / "out")]) == 1
    assert "broken.jpg" in caplog.text and "empty.png" in caplog.text and "No image could be analysed" in caplog.text

    caplog.clear()
    argv = [str(image_folder), "--model", str(model_folder), "--out", str(tmp_path / "out2")]
    assert predict_script.main([*argv, "--target-class", "melanoma"]) == 2
    assert "Unknown `target_class` 'melanoma'" in caplog.text and "'akiec'" in caplog.text

    caplog.clear()
    argv = [str(image_folder), "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out3")]
    assert predict_script.main(argv) == 2 and "no-such-model" in caplog.text

    caplog.clear()
    argv = [str(image_folder), "--model", str(model_folder), "--out", str(tmp_path / "out4")]
    assert predict_script.main([*argv, "--backend", "fast", "--method", "eigencam"]) == 2
    assert "'eigencam'" in caplog.text and "'gradcam++'" in caplog.text  # the fast backend's methods listed


def test_usage_errors_exit_2_before_loading_anything(predict_script, image_folder, tmp_path, capsys):
    for argv, message in (
        ([str(image_folder), "--out", str(tmp_path), "--method", "nope"], "invalid choice: 'nope'"),
        ([str(image_folder), "--out", str(tmp_path), "--batch-size", "0"], "--batch-size must be positive"),
        ([str(tmp_path / "missing"), "--out", str(tmp_path)], "missing does not exist"),
    ):
        with pytest.raises(SystemExit) as exit:
            predict_script.main(argv)
        assert exit.value.code == 2 and message in capsys.readouterr().err


def test_unreachable_hub_id_fails_with_one_line(predict_script, tmp_path, caplog):
    """Offline, a Hub id that is not cached fails with one line naming the shipped checkpoint, no traceback."""
    image = real_images(1)[0]
    assert predict_script.main([str(image), "--model", "org/no-such-model", "--out", str(tmp_path / "out")]) == 2
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and "checkpoints/skin-dualnet-small" in errors[0].getMessage()
    assert len(errors[0].getMessage().splitlines()) == 1 and errors[0].exc_info is None


@pytest.mark.parametrize("script", ["predict.py", "demo.py"])
def test_unreachable_hub_id_fails_before_torch_is_imported(script, tmp_path):
    """A new interpreter, as a user runs the script: the id is checked before the heavy imports, so it fails in about
    a second (timed in the closing note of issue 13, not here); the process reports whether torch got imported."""
    argv = [str(real_images(1)[0]), "--model", "org/no-such-model", "--out", str(tmp_path)]
    if script == "demo.py":
        argv = ["org/no-such-model", "--no-launch"]
    probe = f"""
import runpy, sys
sys.argv = [{str(SCRIPTS / script)!r}, *{argv!r}]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    if not isinstance(exit.code, int):
        print(exit.code, file=sys.stderr)  # what the interpreter prints for a message exit
    print(exit.code if isinstance(exit.code, int) else 1, "torch" in sys.modules)
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    code, torch_imported = run.stdout.split()[-2:]
    assert int(code) != 0 and torch_imported == "False", run.stdout + run.stderr
    assert "checkpoints/skin-dualnet-small" in run.stdout + run.stderr
