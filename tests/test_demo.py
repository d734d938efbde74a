"""The README's main command (`scripts/demo.py`, run by `bash scripts/run.sh demo`) and its bundled sample: the sample
keeps the official HAM10000 layout and is reproducible; a short demo run trains, exports a folder the Space loads,
records its validation numbers, is reused on the next run, and launches a working server."""

import contextlib
import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import LABELS, REPO_ROOT, SCRIPTS, SPACE
from PIL import Image

DEMO = SCRIPTS / "demo.py"
SAMPLE = SCRIPTS / "demo_data" / "ham10000-sample"
OFFICIAL_COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
CLASSES = set(LABELS)


def sample_rows() -> list[dict[str, str]]:
    with (SAMPLE / "HAM10000_metadata.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------------------------------------
# The bundled sample
# --------------------------------------------------------------------------------------------------------------------
def test_bundled_sample_has_the_official_layout():
    with (SAMPLE / "HAM10000_metadata.csv").open(newline="") as handle:
        assert next(csv.reader(handle)) == OFFICIAL_COLUMNS
    rows = sample_rows()
    assert 250 <= len(rows) <= 350
    assert {row["dx"] for row in rows} == CLASSES
    images = sorted(p.stem for p in (SAMPLE / "images").glob("ISIC_*.jpg"))
    masks = sorted(p.name.removesuffix("_segmentation.png") for p in (SAMPLE / "masks").glob("*_segmentation.png"))
    assert images == masks == sorted(row["image_id"] for row in rows)
    for image_id in images[:20]:
        with Image.open(SAMPLE / "images" / f"{image_id}.jpg") as image:
            assert image.size == (200, 150) and image.mode == "RGB"
        with Image.open(SAMPLE / "masks" / f"{image_id}_segmentation.png") as mask:
            assert mask.size == (200, 150) and set(mask.convert("L").getdata()) <= {0, 255}
    size = sum(path.stat().st_size for path in SAMPLE.rglob("*") if path.is_file())
    assert size < 6 * 1024 * 1024
    attribution = (SAMPLE / "ATTRIBUTION.md").read_text() + (SAMPLE / "LICENSE").read_text()
    for required in ("CC BY-NC 4.0", "10.7910/DVN/DBW86T", "Tschandl", "180161", "Non-commercial"):
        assert required.lower() in attribution.lower(), required


def test_bundled_sample_loads_with_the_project_loader():
    from modeling_skinlesion.data import load_ham10000

    dataset = load_ham10000(SAMPLE, masks=True)
    assert len(dataset) == len(sample_rows())


def test_bundled_sample_is_reproducible_and_holds_whole_lesions(data_root, tmp_path):
    out = tmp_path / "sample"
    subprocess.run(
        [sys.executable, str(SCRIPTS / "make_demo_sample.py"), "--source", str(data_root / "ham10000"),
         "--out", str(out)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert (out / "HAM10000_metadata.csv").read_text() == (SAMPLE / "HAM10000_metadata.csv").read_text()
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(p.name for p in (SAMPLE / "images").iterdir())
    with (data_root / "ham10000" / "HAM10000_metadata.csv").open(newline="") as handle:
        source = list(csv.DictReader(handle))
    chosen = {row["lesion_id"] for row in sample_rows()}
    expected = sorted(row["image_id"] for row in source if row["lesion_id"] in chosen)
    assert expected == sorted(row["image_id"] for row in sample_rows())  # every image of every chosen lesion


# --------------------------------------------------------------------------------------------------------------------
# A short demo run
# --------------------------------------------------------------------------------------------------------------------
def import_demo(monkeypatch):
    """`scripts/demo.py` as a module, run in this process (the Space model it selects is reset afterwards)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.setenv("SKIN_DUALNET_MODEL", "")  # demo.py sets it; monkeypatch restores it
    import demo

    return demo


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory) -> tuple[Path, str]:
    """A short demo run (`demo.py --train-demo --max-steps 2 --no-launch`, in this process; the training and export
    scripts it runs are subprocesses as always): the export folder and what demo.py printed."""
    output = tmp_path_factory.mktemp("demo") / "demo-model"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(printed):
        demo = import_demo(monkeypatch)
        status = demo.main(["--train-demo", "--output-dir", str(output), "--max-steps", "2", "--no-launch"])
    assert status == 0, printed.getvalue()[-3000:]
    return output, printed.getvalue()


@pytest.mark.slow
def test_demo_trains_and_exports_a_complete_folder_with_its_validation_numbers(demo_export):
    output, printed = demo_export
    assert output.with_name("demo-model-runs").is_dir()  # the training runs, beside the export
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "demo_run.json"):
        assert (output / name).is_file(), name
    config = json.loads((output / "config.json").read_text())
    assert "skin-lesion-analysis" in config["custom_pipelines"] and "AutoModel" in config["auto_map"]
    record = json.loads((output / "demo_run.json").read_text())
    assert record["demo"] is True and record["num_images"] == len(sample_rows())
    assert 0.0 <= record["segmenter"]["validation"]["dice"] <= 1.0
    assert 0.0 <= record["classifier"]["validation"]["balanced_accuracy"] <= 1.0
    assert record["segmenter"]["steps"] == record["classifier"]["steps"] == 2
    assert record["classifier"]["split"]["validation"]["images"] > 0
    card = (output / "README.md").read_text()
    assert "DEMO WEIGHTS" in card and "not a usable model" in card
    assert "Segmenter validation Dice" in card and "balanced_accuracy" in card
    assert "license: cc-by-nc-4.0" in card
    assert "Demo model ready" in printed and "dice" in printed


@pytest.mark.slow
def test_demo_export_serves_the_space(demo_export):
    from test_space import import_space_app

    app = import_space_app()
    output, _ = demo_export
    model = app.get_model(str(output))
    assert model.ok, model.error
    assert "DEMO WEIGHTS" in model.training_data and "HAM10000" in model.training_data
    outputs = app.predict(str(SPACE / "examples" / "ISIC_0000002.jpg"), 60, "female", "upper extremity",
                          source=str(output))  # fmt: skip
    assert set(outputs[4]) == CLASSES


@pytest.mark.slow
def test_demo_reuses_a_complete_export_and_checks_a_given_model(demo_export, tmp_path, monkeypatch, capsys):
    demo = import_demo(monkeypatch)
    output, _ = demo_export
    stamp = (output / "model.safetensors").stat().st_mtime_ns
    assert demo.main(["--train-demo", "--output-dir", str(output), "--no-launch"]) == 0
    again = capsys.readouterr().out
    assert "Reusing the demo weights" in again and "train_segmenter.py" not in again
    assert (output / "model.safetensors").stat().st_mtime_ns == stamp
    assert demo.main([str(output), "--no-launch"]) == 0 and "loads" in capsys.readouterr().out
    (tmp_path / "config.json").write_text("{")
    assert demo.main([str(tmp_path), "--no-launch"]) == 1 and "cannot be loaded" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_launches_the_space_and_says_these_are_demo_weights(demo_export, tmp_path):
    from gradio_client import Client, handle_file

    output, _ = demo_export
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (tmp_path / "demo.log").open("w+")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(
        [sys.executable, str(DEMO), "--train-demo", "--output-dir", str(output), "--port", str(port)],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert process.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the Space did not start within 180 s"
                time.sleep(1)
        example = SPACE / "examples" / "ISIC_0000000.jpg"
        result = Client(url, verbose=False).predict(handle_file(str(example)), 55, "female", "anterior torso",
                                                    api_name="/predict")  # fmt: skip
        assert result[4]["label"] in CLASSES
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    printed = (tmp_path / "demo.log").read_text()
    assert "THESE ARE DEMO WEIGHTS" in printed and "NOT a usable model" in printed
    assert f"http://127.0.0.1:{port}" in printed


@pytest.mark.slow
def test_main_command_serves_the_shipped_checkpoint_without_training(monkeypatch, capsys):
    """`bash scripts/run.sh demo` = `scripts/demo.py` without arguments: the shipped checkpoint, no training."""
    demo = import_demo(monkeypatch)
    assert demo.main(["--no-launch"]) == 0
    printed = capsys.readouterr().out
    assert "checkpoints/skin-dualnet-small" in printed and "loads" in printed
    assert "train_segmenter.py" not in printed


def test_unreachable_model_id_fails_fast_and_launches_nothing(monkeypatch):
    """One line naming the local alternatives, before the Space is imported or anything is launched."""
    demo = import_demo(monkeypatch)

    launched = []
    monkeypatch.setattr(demo, "launch", lambda *args: launched.append(args))
    for argv in (["org/not-published-yet"], ["org/not-published-yet", "--no-launch"]):
        with pytest.raises(SystemExit) as caught:
            demo.main(argv)
        message = str(caught.value.code)
        assert message.startswith("Cannot load 'org/not-published-yet'") and "\n" not in message
        assert "checkpoints/skin-dualnet-small" in message and "outputs/demo-model" in message
    assert launched == []
