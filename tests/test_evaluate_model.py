"""scripts/evaluate_model.py: metrics of saved models on real data, the training run's validation split, and ISIC
submission files that the official scorer (`isic-challenge-scoring`) reads and scores exactly as our metrics do."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate import PartialState
from conftest import SCRIPTS, tiny_classifier, tiny_segmenter
from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore
from isic_challenge_scoring.segmentation import SegmentationScore
from transformers import AutoConfig

import modeling_skinlesion as sl
from modeling_skinlesion.data import column_values, load_ham10000

sys.path.insert(0, str(SCRIPTS))
import evaluate_model  # noqa: E402

from modeling_skinlesion.training import evaluation as _evaluation  # noqa: E402
from modeling_skinlesion.training import loop as _training  # noqa: E402
from modeling_skinlesion.training.arguments import parse_arguments  # noqa: E402

SCRIPT = SCRIPTS / "evaluate_model.py"
SEGMENTATION_KEYS = {
    "dice": "dice",
    "jaccard": "jaccard",
    "thresholded_jaccard": "threshold_jaccard",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "accuracy": "accuracy",
}


def run_evaluate(*args: str, cwd: Path) -> dict:
    """Run the script as a user does (a new interpreter: its log lines must survive the `evaluate` library's logging
    set-up); check it logs its scores and where it wrote them; return its metrics.json."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--batch-size", "8"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return checked_metrics(args, cwd, result.stdout + result.stderr)


def evaluate_in_process(*args: str, cwd: Path, monkeypatch, caplog) -> dict:
    """`evaluate_model.main(argv)` in this process, from `cwd`; the same checks as `run_evaluate`."""
    monkeypatch.chdir(cwd)
    with caplog.at_level(logging.INFO):
        evaluate_model.main([*args, "--batch-size", "8"])
    return checked_metrics(args, cwd, caplog.text)


def checked_metrics(args: tuple[str, ...], cwd: Path, log: str) -> dict:
    output_dir = cwd / args[args.index("--output-dir") + 1]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert f"Wrote {args[args.index('--output-dir') + 1]}/metrics.json" in log
    score = "dice" if metrics["task"] == "segmentation" else "balanced_accuracy"
    assert f"{score} {metrics['metrics'][score]:.4f}" in log
    return metrics


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    tiny_segmenter().save_pretrained(folder / "segmenter")
    classifier = tiny_classifier()
    classifier.save_pretrained(folder / "classifier")
    sl.SkinLesionImageProcessor.from_model_config(classifier.config).save_pretrained(folder / "classifier")
    return folder


@pytest.fixture
def official_csv_parser(monkeypatch):
    """isic-challenge-scoring 5.6 calls `DataFrame.applymap`, which pandas 3 removed after renaming it `map` (same
    behaviour); give the scorer its old name back so its own CSV parser runs unchanged."""
    if not hasattr(pd.DataFrame, "applymap"):
        monkeypatch.setattr(pd.DataFrame, "applymap", pd.DataFrame.map, raising=False)


@pytest.mark.slow
def test_segmentation_submission_is_scored_identically_by_official_scorer(saved_models, data_root, tmp_path):
    result = run_evaluate(
        "--model", str(saved_models / "segmenter"),
        "--dataset", "isic2017", "--data-root", str(data_root / "isic2017"),
        "--split", "validation", "--max-eval-samples", "10",
        "--output-dir", "eval", "--submission-dir", "submission",
        cwd=tmp_path,
    )  # fmt: skip
    assert result["task"] == "segmentation" and result["num_images"] == 10 and result["split"] == "validation"
    submitted = sorted((tmp_path / "submission").glob("ISIC_*_segmentation.png"))
    assert len(submitted) == 10
    # The ground truth of the same images, in the layout the official scorer reads.
    truth = tmp_path / "truth"
    truth.mkdir()
    for file in submitted:
        shutil.copy(data_root / "isic2017" / "masks" / file.name, truth / file.name)
    official = SegmentationScore.from_dir(truth, tmp_path / "submission").macro_average
    for ours, theirs in SEGMENTATION_KEYS.items():
        assert abs(result["metrics"][ours] - official[theirs]) < 1e-6, (
            ours,
            result["metrics"][ours],
            official[theirs],
        )
    # Scored at the original (downscaled ISIC 2017) size, not the model's 64 px.
    assert max(np.asarray(pd.read_csv(data_root / "isic2017" / "manifest.csv")["width"])) > 64


def make_clinic(data_root: Path, folder: Path, per_class: int = 5) -> tuple[Path, Path]:
    """A clinic layout from real HAM10000 images: renamed files, a CSV with its own column names, one corrupt file."""
    ham = load_ham10000(data_root / "ham10000", masks=False)
    labels, images = column_values(ham, "label"), column_values(ham, "image")
    names = sl.SkinDualNetConfig().id2label
    images_dir = folder / "photos"
    images_dir.mkdir(parents=True)
    rows = []
    for label, name in names.items():
        for i in [i for i, value in enumerate(labels) if value == label][:per_class]:
            file = f"case_{len(rows):03d}.jpg"
            shutil.copy(images[i]["path"], images_dir / file)
            rows.append({"file": file, "diagnosis": name, "patient": f"p{len(rows)}", "years": 50})
    (images_dir / "case_broken.jpg").write_bytes((images_dir / "case_000.jpg").read_bytes()[:300])
    rows.append({"file": "case_broken.jpg", "diagnosis": "nv", "patient": "px", "years": 40})
    csv = folder / "cases.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return images_dir, csv


@pytest.mark.slow
def test_classification_submission_is_scored_identically_by_official_scorer(
    saved_models, data_root, tmp_path, official_csv_parser, monkeypatch, caplog, in_process_run
):
    images_dir, csv = make_clinic(data_root, tmp_path / "clinic", per_class=4)
    result = evaluate_in_process(
        "--model", str(saved_models / "classifier"),
        "--dataset", "clinic", "--data-root", str(images_dir), "--clinic-csv", str(csv),
        "--column-map", "image=file", "label=diagnosis", "group_id=patient", "age=years",
        "--split", "all", "--output-dir", "eval", "--submission-dir", "submission", "--lesion-focus",
        cwd=tmp_path, monkeypatch=monkeypatch, caplog=caplog,
    )  # fmt: skip
    metrics = result["metrics"]
    assert result["task"] == "classification" and result["num_samples"] == 28
    # The corrupt file is reported by name and skipped.
    assert [entry[0] for entry in result["bad_files"]["bad_images"]] == ["case_broken"]
    # Per-branch Grad-CAM lesion focus: a share of heatmap mass, over the images whose heatmap has any (an untrained
    # model's image-branch Grad-CAM can be all zero after its ReLU).
    focus, counted = result["lesion_focus"], result["lesion_focus_images"]
    assert set(focus) == set(counted) == {"image", "lesion", "chance"} and counted["lesion"] > 0
    for branch in focus:
        assert (focus[branch] is None) == (counted[branch] == 0)
        assert focus[branch] is None or 0.0 <= focus[branch] <= 1.0

    submission = tmp_path / "submission" / "predictions.csv"
    table = pd.read_csv(submission)
    assert list(table.columns) == ["image", "akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"] and len(table) == 28
    cases = pd.read_csv(csv).iloc[:-1]
    truth = pd.DataFrame(0.0, index=range(28), columns=table.columns[1:])
    for i, diagnosis in enumerate(cases["diagnosis"]):
        truth.loc[i, diagnosis] = 1.0
    truth.insert(0, "image", [Path(f).stem for f in cases["file"]])
    truth.to_csv(tmp_path / "truth.csv", index=False)
    official = ClassificationScore.from_file(
        tmp_path / "truth.csv", submission, ClassificationMetric.BALANCED_ACCURACY
    )
    assert abs(metrics["balanced_accuracy"] - official.aggregate["balanced_accuracy"]) < 1e-6
    assert abs(metrics["macro_auc"] - official.macro_average["auc"]) < 1e-6
    for name in table.columns[1:]:
        assert abs(metrics["per_class_auc"][name] - official.per_category.loc[name, "auc"]) < 1e-6


def split_args(data_root: Path, *extra: str):
    """The data and split options of a training run, parsed as evaluate_model.py parses them."""
    argv = [
        "--model", "unused", "--output-dir", "unused",
        "--dataset", "ham10000", "--data-root", str(data_root / "ham10000"),
        "--test-size", "0.1", "--split-seed", "3", "--bad-files", "unchecked", *extra,
    ]  # fmt: skip
    return parse_arguments(evaluate_model.EvaluateModelArguments, argv)


def test_validation_split_is_the_training_split(data_root):
    """The training scripts' split helper (`_training.prepare_splits`) and evaluate_model.py pick the same images."""
    PartialState()  # the training helpers log through Accelerate
    args = split_args(data_root, "--max-eval-samples", "60")
    dataset = _training.load_sources(args, "classification", label_set="ham10000")
    args.max_train_samples = None  # what prepare_splits reads of the training options
    trained_on, _ = _training.prepare_splits(args, dataset, stratify_column="label", require_masks=False)
    validation = _evaluation.select_split(args, dataset, "label")
    assert column_values(validation, "image_id") == column_values(trained_on["validation"], "image_id")
    # Training never caps its test split.
    test = _evaluation.select_split(split_args(data_root, "--split", "test"), dataset, "label")
    assert column_values(test, "image_id") == column_values(trained_on["test"], "image_id")
    assert len(validation) == 60 and len(test) > 500


def test_splits_file_selects_the_recorded_ids(data_root, tmp_path):
    dataset = load_ham10000(data_root / "ham10000", masks=False)
    ids = column_values(dataset, "image_id")
    recorded = {"validation": ids[10:20], "train": ids[:10]}
    (tmp_path / "splits.json").write_text(json.dumps(recorded))
    args = split_args(data_root, "--splits-file", str(tmp_path / "splits.json"))
    assert column_values(_evaluation.select_split(args, dataset, "label"), "image_id") == ids[10:20]
    args = split_args(data_root, "--splits-file", str(tmp_path / "splits.json"), "--split", "test")
    with pytest.raises(ValueError, match="no 'test' split"):
        _evaluation.select_split(args, dataset, "label")


def test_labels_the_model_does_not_predict_are_refused(saved_models, data_root, tmp_path):
    images_dir, csv = make_clinic(data_root, tmp_path / "clinic", per_class=1)
    table = pd.read_csv(csv)
    table.loc[0, "diagnosis"] = "dermatofibrosarcoma"
    table.to_csv(csv, index=False)
    argv = [
        "--model", str(saved_models / "classifier"), "--dataset", "clinic", "--data-root", str(images_dir),
        "--clinic-csv", str(csv), "--column-map", "image=file", "label=diagnosis", "--split", "all",
        "--output-dir", str(tmp_path / "eval"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"\['dermatofibrosarcoma'\] that the model does not predict.*finetune"):
        evaluate_model.main(argv)


def test_rejects_models_that_are_not_skin_dualnet(tmp_path):
    AutoConfig.for_model("vit").save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="'vit' model"):
        _evaluation.load_model(str(tmp_path / "vit"), torch.device("cpu"))


def test_ablation_report_scores_every_variant_on_the_shared_test_split(data_root, tmp_path):
    """scripts/ablation_report.py on two saved classifiers that share a recorded test split: per-variant predictions
    for exactly those images, a metadata-withheld variant, bootstrap differences, and the export chosen by the
    training runs' validation score (never the test score)."""
    import ablation_report

    ham = load_ham10000(data_root / "ham10000", masks=True)
    ids, labels = column_values(ham, "image_id"), column_values(ham, "label")
    test_ids = [ids[i] for label in (2, 4, 5) for i in [i for i, x in enumerate(labels) if x == label][:2]]
    for name, seed, validation in (("single", 0, 0.2), ("full", 1, 0.4)):
        folder = tmp_path / name
        tiny_classifier(seed).save_pretrained(folder)
        (folder / "splits.json").write_text(json.dumps({"train": [], "validation": [], "test": test_ids}))
        counts = {label: 10 for label in sl.SkinDualNetConfig().id2label.values()}
        record = {"best": {"value": validation}, "split": {"train": {"class_counts": counts}}}
        (folder / "metrics.json").write_text(json.dumps(record))
    argv = [
        "--data-root", str(data_root / "ham10000"), "--output-dir", str(tmp_path / "report"),
        "--model", f"a={tmp_path / 'single'}", f"c={tmp_path / 'full'}", "--no-metadata-variant", "d=c",
        "--focus-samples", "2", "--bootstrap", "20", "--batch-size", "4", "--device", "cpu",
    ]  # fmt: skip
    result = ablation_report.main(argv)

    assert set(result["variants"]) == {"a", "c", "d"} and result["test_images"] == 6
    assert result["variants"]["d"]["metadata_withheld"] and not result["variants"]["c"]["metadata_withheld"]
    for name in ("a", "c", "d"):
        table = pd.read_csv(tmp_path / "report" / f"predictions_{name}.csv")
        assert sorted(table["image_id"]) == sorted(test_ids)
        assert result["variants"][name]["lesion_focus_images"]["image"] == 2
    assert result["export"]["variant"] == "c"  # the higher validation balanced accuracy
    assert set(result["differences"]["balanced_accuracy"]) == {"c-a", "c-d"}
    card = json.loads((tmp_path / "report" / "card_metrics.json").read_text())
    assert card["model"] == str(tmp_path / "full") and card["num_samples"] == 6
