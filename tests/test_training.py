"""The two training scripts, run as a user runs them (subprocesses on real images): end to end (with TensorBoard
logging), bad files, offline backbones, a run killed after a checkpoint and resumed, and the cached-feature recipe
trained, resumed and calibrated; plus their shared command line, parsed in process."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, SCRIPTS
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel

from modeling_skinlesion import SkinDualNet, SkinLesionSegmenter
from modeling_skinlesion.data import column_values, concatenate_sources, grouped_split, load_ham10000, load_isic2017

sys.path.insert(0, str(SCRIPTS))
import train_classifier  # noqa: E402
import train_segmenter  # noqa: E402

from modeling_skinlesion.training import arguments as _arguments  # noqa: E402

# One thread per process: on a small shared CI box, two OpenMP threads competing with other jobs make each training
# step tens of times slower.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_script(name: str, *args: str, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *map(str, args)],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source.resolve())


@pytest.fixture(scope="module")
def small_data(data_root: Path, tmp_path_factory) -> dict[str, Path]:
    """A HAM10000-layout folder with 36 real images of 5 classes and their masks, one training image truncated, plus
    an ISIC 2017-layout folder with 12 real image/mask pairs."""
    root = tmp_path_factory.mktemp("data")
    table = pd.read_csv(data_root / "ham10000" / "HAM10000_metadata.csv")
    picked = pd.concat(
        [table[table["dx"] == dx].head(n) for dx, n in [("nv", 16), ("mel", 8), ("bkl", 6), ("bcc", 4), ("df", 2)]]
    )
    ham = root / "ham10000"
    for image_id in picked["image_id"]:
        _link(
            data_root / "ham10000" / "images" / f"{image_id}.jpg", ham / "HAM10000_images_part_1" / f"{image_id}.jpg"
        )
        name = f"{image_id}_segmentation.png"
        _link(data_root / "ham10000" / "masks" / name, ham / "masks" / name)
    picked.to_csv(ham / "HAM10000_metadata.csv", index=False)

    isic = root / "isic2017"
    manifest = pd.read_csv(data_root / "isic2017" / "manifest.csv")
    manifest = manifest[manifest["has_isic2017_mask"] == 1].head(12)
    for image_id in manifest["image_id"]:
        _link(data_root / "isic2017" / "images" / f"{image_id}.jpg", isic / "images" / f"{image_id}.jpg")
        name = f"{image_id}_segmentation.png"
        _link(data_root / "isic2017" / "masks" / name, isic / "masks" / name)
    manifest.to_csv(isic / "manifest.csv", index=False)

    # Truncate one image that both scripts' splits (seed 0, 25 % validation) put in the training set: the
    # classifier's (HAM10000, by class) and the segmenter's (HAM10000 + ISIC 2017, by source).
    ham_rows = load_ham10000(ham, masks=True)
    by_class = grouped_split(ham_rows, val_size=0.25, seed=0)["train"]
    joined = concatenate_sources([ham_rows, load_isic2017(isic)], drop_labels=True)
    by_source = grouped_split(joined, val_size=0.25, seed=0, stratify_column="source")["train"]
    corrupt = sorted(set(column_values(by_class, "image_id")) & set(column_values(by_source, "image_id")))[0]
    path = ham / "HAM10000_images_part_1" / f"{corrupt}.jpg"
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 3])
    return {"ham10000": ham, "isic2017": isic, "corrupt": corrupt}


@pytest.fixture(scope="module")
def segmenter_run(small_data, presets: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    output = tmp_path_factory.mktemp("segmenter")
    result = run_script(
        "train_segmenter.py",
        "--config", presets / "segmenter-tiny.json",
        "--dataset", "ham10000", "--data-root", small_data["ham10000"],
        "--dataset", "isic2017", "--data-root", small_data["isic2017"],
        "--output-dir", output, "--val-size", "0.25",
        "--epochs", "2", "--batch-size", "4", "--checkpointing-steps", "3", "--keep-checkpoints", "2",
        "--bad-files", "unchecked",  # let the truncated image reach the DataLoader
        "--mixed-precision", "bf16", "--report-to", "tensorboard",
    )  # fmt: skip
    return output, result


def test_both_scripts_share_their_options_and_defaults():
    """One declaration per option: the two training scripts print the same help for every shared option, the
    classifier's --config example names a classifier preset, and a switch reads --flag/--no-flag."""
    helps = {}
    for name, arguments in (
        ("segmenter", train_segmenter.SegmenterArguments),
        ("classifier", train_classifier.TrainClassifierArguments),
    ):
        parser = _arguments.ArgumentParser(arguments)
        helps[name] = {action.option_strings[0]: action.help for action in parser._actions if action.option_strings}
    shared = set(helps["segmenter"]) & set(helps["classifier"])
    assert {"--dataset", "--val-size", "--lr", "--resume", "--holdout-splits", "--gradient-checkpointing"} <= shared
    for option in shared - {"--config", "-h"}:
        assert helps["segmenter"][option] == helps["classifier"][option], option
    assert {"--segmenter", "--class-weights", "--frozen-stages", "--calibrate"} <= set(helps["classifier"])
    assert "skin-dualnet.json" in helps["classifier"]["--config"] and "segmenter" in helps["segmenter"]["--config"]
    help_text = _arguments.ArgumentParser(train_classifier.TrainClassifierArguments).format_help()
    assert "--calibrate, --no-calibrate" in help_text and "[CALIBRATE]" not in help_text


def test_usage_errors_name_the_option(capsys):
    required = ["--config", "c.json", "--output-dir", "out"]
    for argv, message in (
        (["--dataset", "ham10000"], "give one --data-root per --dataset"),
        (["--dataset", "ham10000", "--data-root", "x", "--checkpointing-steps", "often"], "--checkpointing-steps"),
        (["--dataset", "ham10000", "--data-root", "x", "--grad-accum", "0"], "--grad-accum must be at least 1"),
        (["--dataset", "clinic", "--data-root", "x"], "--dataset clinic needs --clinic-csv"),
    ):
        with pytest.raises(SystemExit) as error:
            _arguments.parse_arguments(train_segmenter.SegmenterArguments, required + argv)
        assert error.value.code == 2 and message in capsys.readouterr().err, argv
    # Repeated list options extend: two sources.
    args = _arguments.parse_arguments(
        train_segmenter.SegmenterArguments,
        required + ["--dataset", "ham10000", "--data-root", "a", "--dataset", "isic2017", "--data-root", "b"],
    )
    assert args.dataset == ["ham10000", "isic2017"] and args.data_root == ["a", "b"] and args.lr == 3e-4


@pytest.mark.slow
def test_segmenter_end_to_end_with_a_corrupt_training_image(segmenter_run, small_data):
    output, result = segmenter_run
    log = result.stdout + result.stderr
    # The truncated image is skipped by name; the epochs finish.
    assert small_data["corrupt"] in log
    metrics = json.loads((output / "metrics.json").read_text())
    assert [record["epoch"] for record in metrics["history"]] == [0, 1]
    assert sum(record["dropped_files"] for record in metrics["history"]) == 2  # once per epoch
    assert metrics["best"]["metric"] == "dice" and 0 <= metrics["best"]["value"] <= 1
    assert metrics["best"]["value"] == max(r["validation"]["dice"] for r in metrics["history"])
    assert set(metrics["best"]["validation"]) >= {"dice", "jaccard", "thresholded_jaccard", "sensitivity"}
    assert metrics["split"]["train"]["images"] + metrics["split"]["validation"]["images"] == 36 + 12
    assert "epoch 2/2" in result.stdout
    # A loadable model and processor, equal to the best epoch's weights.
    model = AutoModel.from_pretrained(output)
    assert isinstance(model, SkinLesionSegmenter)
    best = load_file(output / "checkpoints" / "best_model" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, best[name], rtol=0, atol=0)
    assert AutoImageProcessor.from_pretrained(output).size == {"height": 64, "width": 64}
    # The library's model card: the training sets, the run's facts and the best epoch's validation scores.
    card = ModelCard.load(output / "README.md")
    assert card.data.datasets == ["HAM10000", "ISIC-2017"] and card.data.pipeline_tag == "image-segmentation"
    assert f"| dice | {metrics['best']['value']:.4f} |" in card.text and "epochs, " in card.text
    # Checkpoints every 3 steps and at each epoch end, rotated down to the 2 newest.
    steps = metrics["steps"]
    saved = sorted({*range(3, steps + 1, 3), *(r["step"] for r in metrics["history"])})[-2:]
    assert sorted(p.name for p in (output / "checkpoints").glob("checkpoint-*")) == sorted(
        f"checkpoint-{s}" for s in saved
    )
    assert steps == 2 * math.ceil(metrics["split"]["train"]["images"] / 4)
    splits = json.loads((output / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["validation"])


@pytest.mark.slow
def test_classifier_end_to_end_contains_the_trained_segmenter(segmenter_run, small_data, presets, tmp_path):
    segmenter_dir, _ = segmenter_run
    result = run_script(
        "train_classifier.py",
        "--config", presets / "skin-dualnet-tiny.json", "--segmenter", segmenter_dir,
        "--dataset", "ham10000", "--data-root", small_data["ham10000"],
        "--output-dir", tmp_path, "--val-size", "0.25",
        "--epochs", "2", "--batch-size", "4", "--grad-accum", "2", "--class-weights", "balanced",
    )  # fmt: skip
    assert small_data["corrupt"] in result.stdout + result.stderr  # skipped by the file check before training
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["bad_files"]["train"]["bad_images"][0][0] == small_data["corrupt"]
    assert len(metrics["history"]) == 2 and metrics["best"]["metric"] == "balanced_accuracy"
    validation = metrics["best"]["validation"]
    assert set(validation) >= {"accuracy", "balanced_accuracy", "macro_auc", "per_class_auc", "ece"}
    # Batches of 4 with 2 accumulation steps (the last window of an epoch may be short).
    assert metrics["steps"] == 2 * math.ceil(math.ceil(metrics["split"]["train"]["images"] / 4) / 2)

    model = AutoModel.from_pretrained(tmp_path)
    assert isinstance(model, SkinDualNet)
    assert list(model.config.id2label.values()) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert model.config.class_weights == pytest.approx(metrics["class_weights"])
    assert (
        model.config.class_weights[model.config.label2id["df"]]
        > model.config.class_weights[model.config.label2id["nv"]]
    )
    # One checkpoint is the whole system: the trained segmenter is inside, unchanged by classifier training.
    segmenter = SkinLesionSegmenter.from_pretrained(segmenter_dir)
    for name, tensor in segmenter.state_dict().items():
        torch.testing.assert_close(model.segmenter.state_dict()[name], tensor, rtol=0, atol=0)
    with torch.no_grad():
        out = model.eval()(pixel_values=torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, 7) and out.lesion_mask.shape == (1, 1, 64, 64)


@pytest.mark.slow
def test_report_to_tensorboard_logs_every_epoch(segmenter_run):
    """`--report-to` hands the trackers to Accelerate: one scalar per metric and epoch in TensorBoard's event file."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    output, _ = segmenter_run
    # The run's folder holds the scalars; TensorBoard writes the hyper-parameters into a sub-folder of their own.
    run_dir = output / "skin-dualnet-segmenter"
    assert list(run_dir.glob("events.out.tfevents.*")), sorted(p.relative_to(output) for p in output.rglob("*"))
    accumulator = event_accumulator.EventAccumulator(str(run_dir))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train_loss", "val_dice", "val_jaccard"} <= tags, tags
    dice = [event.value for event in accumulator.Scalars("val_dice")]
    metrics = json.loads((output / "metrics.json").read_text())
    assert [event.step for event in accumulator.Scalars("val_dice")] == [0, 1]
    assert dice == pytest.approx([epoch["validation"]["dice"] for epoch in metrics["history"]], abs=1e-6)


@pytest.mark.slow
def test_bad_files_raise_names_the_file(small_data, presets, tmp_path, in_process_run):
    with pytest.raises(ValueError) as error:
        train_segmenter.main(
            [
                "--config", str(presets / "segmenter-tiny.json"),
                "--dataset", "ham10000", "--data-root", str(small_data["ham10000"]),
                "--output-dir", str(tmp_path), "--val-size", "0.25", "--bad-files", "raise",
            ]
        )  # fmt: skip
    assert f"{small_data['corrupt']}.jpg" in str(error.value) and "truncated" in str(error.value)


@pytest.mark.slow
def test_backbone_pretrained_fails_clearly_offline(small_data, presets, tmp_path, in_process_run):
    with pytest.raises(RuntimeError) as error:
        train_classifier.main(
            [
                "--config", str(presets / "skin-dualnet-tiny.json"),
                "--dataset", "ham10000", "--data-root", str(small_data["ham10000"]),
                "--output-dir", str(tmp_path), "--val-size", "0.25", "--backbone-pretrained",
            ]
        )  # fmt: skip
    message = str(error.value)
    assert "--backbone-pretrained could not download" in message and "offline" in message


@pytest.mark.slow
def test_resume_after_kill_matches_an_uninterrupted_run(small_data, presets, tmp_path):
    """Kill a run (SIGKILL) once a checkpoint exists, `--resume latest`, and compare with a run never stopped."""
    arguments = [
        "--config", presets / "segmenter-tiny.json",
        "--dataset", "ham10000", "--data-root", small_data["ham10000"],
        "--val-size", "0.25", "--epochs", "2", "--batch-size", "2",
        "--checkpointing-steps", "4", "--keep-checkpoints", "2", "--seed", "7",
        "--max-train-samples", "12", "--max-eval-samples", "4",  # 6 steps an epoch: killed in the second
    ]  # fmt: skip
    # The uninterrupted reference runs beside the run to be killed (one thread each).
    reference = tmp_path / "reference"
    command = [sys.executable, str(SCRIPTS / "train_segmenter.py"), *map(str, arguments), "--output-dir"]
    reference_log = (tmp_path / "reference.log").open("w+")  # a file: a full pipe would stall the run
    uninterrupted = subprocess.Popen(
        [*command, reference], cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=reference_log
    )
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [*command, interrupted], cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 180
    while not (interrupted / "checkpoints" / "checkpoint-8").is_dir():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (interrupted / "metrics.json").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in (interrupted / "checkpoints").glob("checkpoint-*"))
    uninterrupted.wait(timeout=240)
    reference_log.seek(0)
    assert uninterrupted.returncode == 0, reference_log.read()[-3000:]

    resumed = run_script("train_segmenter.py", *arguments, "--output-dir", interrupted, "--resume", "latest")
    assert f"Resumed from {interrupted / 'checkpoints' / f'checkpoint-{killed_at}'} at step {killed_at}" in (
        resumed.stdout
    )
    expected = json.loads((reference / "metrics.json").read_text())
    actual = json.loads((interrupted / "metrics.json").read_text())
    # Same final step count, no lost epoch, identical validation after every epoch.
    assert actual["steps"] == expected["steps"] == 2 * math.ceil(expected["split"]["train"]["images"] / 2)
    assert [r["epoch"] for r in actual["history"]] == [0, 1]
    for mine, theirs in zip(actual["history"], expected["history"]):
        assert mine["step"] == theirs["step"] and mine["validation"] == theirs["validation"]
    # The model, optimizer and RNG state were restored: the final weights equal the uninterrupted run's.
    final = f"checkpoint-{expected['steps']}"
    reference_weights = load_file(reference / "checkpoints" / final / "model.safetensors")
    resumed_weights = load_file(interrupted / "checkpoints" / final / "model.safetensors")
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(
        load_file(interrupted / "model.safetensors")["segmentation_head.weight"],
        load_file(reference / "model.safetensors")["segmentation_head.weight"],
        rtol=0,
        atol=0,
    )


@pytest.fixture(scope="module")
def efficientnet_preset(presets: Path, tmp_path_factory) -> Path:
    """The tiny classifier preset with a splittable EfficientNet-family test trunk (for --frozen-stages)."""
    config = json.loads((presets / "skin-dualnet-tiny.json").read_text())
    config["encoder_name"] = "test_efficientnet"
    path = tmp_path_factory.mktemp("preset") / "skin-dualnet-tiny-efficientnet.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_frozen_stage_recipe_trains_resumes_and_calibrates(segmenter_run, small_data, efficientnet_preset, tmp_path):
    """--frozen-stages caches the frozen part's outputs (per view, on disk) and trains the rest; a run stopped after
    two epochs continues with `--resume latest`, reading the views back from `feature-cache/` and keeping the earlier
    epochs' records. The final run fits a post-hoc bias and a temperature and stores them with the logit adjustment
    in the config; the saved model reproduces the cached path's validation logits through its ordinary forward, and
    the frozen stages keep their initial weights."""
    segmenter_dir, _ = segmenter_run
    init_dir = tmp_path / "init"
    from transformers import AutoConfig

    SkinDualNet(AutoConfig.from_pretrained(efficientnet_preset)).save_pretrained(init_dir)
    args = (
        "--config", init_dir, "--segmenter", segmenter_dir,
        "--dataset", "ham10000", "--data-root", small_data["ham10000"],
        "--val-size", "0.25", "--batch-size", "4", "--class-weights", "none",
        "--logit-adjustment", "1.0", "--frozen-stages", "2", "--cached-views", "2", "--seed", "3",
        "--gradient-checkpointing", "--tune-logit-bias", "--output-dir", tmp_path / "run",
    )  # fmt: skip
    output = tmp_path / "run"
    first = run_script("train_classifier.py", *args, "--epochs", "2")
    assert "Loaded cached features" not in first.stdout + first.stderr
    before = json.loads((output / "metrics.json").read_text())
    result = run_script("train_classifier.py", *args, "--epochs", "3", "--resume", "latest")
    log = result.stdout + result.stderr
    assert log.count("Loaded cached features") == 3  # two training views and the validation split
    assert f"at step {before['steps']}" in log
    metrics = json.loads((output / "metrics.json").read_text())
    assert [record["epoch"] for record in metrics["history"]] == [0, 1, 2]
    assert metrics["history"][:2] == before["history"] and metrics["steps"] == before["steps"] * 3 // 2
    cache = sorted(p.name for p in (output / "feature-cache").iterdir())
    assert cache == ["train-view0-rank0.pt", "train-view1-rank0.pt", "validation-rank0.pt"]

    model = AutoModel.from_pretrained(output).eval()
    counts = [
        max(metrics["split"]["train"]["class_counts"].get(name, 0), 1) for name in model.config.id2label.values()
    ]
    expected = [math.log(count / sum(counts)) for count in counts]  # empty classes count as one image
    assert model.config.logit_adjustment == pytest.approx(expected)
    calibration = metrics["calibration"]
    assert model.config.temperature == pytest.approx(calibration["temperature"]) and calibration["temperature"] > 0
    assert {"ece_before", "ece_after"} <= set(calibration)

    # The frozen stem and stages keep the initial weights; the stages after them were trained.
    initial = SkinDualNet.from_pretrained(init_dir)
    for prefix, changed in (("image_encoder.trunk.blocks.1.", False), ("image_encoder.trunk.blocks.3.", True)):
        for name in ("image_encoder.trunk.conv_stem.weight",) if not changed else ():
            torch.testing.assert_close(model.state_dict()[name], initial.state_dict()[name], rtol=0, atol=0)
        names = [n for n in model.state_dict() if n.startswith(prefix) and n.endswith("weight")]
        differs = [not torch.equal(model.state_dict()[n], initial.state_dict()[n]) for n in names]
        assert names and (any(differs) if changed else not any(differs)), prefix
    from modeling_skinlesion.training import feature_cache as FC

    view = torch.load(output / "feature-cache" / "validation-rank0.pt", weights_only=False)["view"]
    # Validation logits of the saved model's forward (images, predicted masks) = the cached path's, after temperature.
    from modeling_skinlesion import SkinLesionImageProcessor, SkinLesionMetadataProcessor
    from modeling_skinlesion.data import SkinLesionTransform, build_dataloader

    dataset = load_ham10000(small_data["ham10000"], masks=True)
    ids = json.loads((output / "splits.json").read_text())["validation"]
    dataset = dataset.select([i for i, x in enumerate(column_values(dataset, "image_id")) if x in set(ids)])
    processor = SkinLesionImageProcessor.from_pretrained(output)
    metadata = SkinLesionMetadataProcessor.from_config(model.config)
    loader = build_dataloader(dataset, SkinLesionTransform(processor, metadata_processor=metadata), batch_size=8)
    wrapper = FC.SkinDualNetFromFeatures(model, 2).eval()
    for batch in loader:
        with torch.no_grad():
            full = model(pixel_values=batch["pixel_values"], age=batch["age"], sex_ids=batch["sex_ids"],
                         site_ids=batch["site_ids"]).logits  # fmt: skip
            rows = [view["image_id"].index(i) for i in batch["image_id"]]
            cached = wrapper(
                image_features=view["image_features"][rows].float(),
                lesion_features=view["lesion_features"][rows].float(),
                age=view["age"][rows], sex_ids=view["sex_ids"][rows], site_ids=view["site_ids"][rows],
            ).logits  # fmt: skip
        torch.testing.assert_close(full, cached, rtol=1e-4, atol=1e-4)
    assert "Temperature" in result.stdout
