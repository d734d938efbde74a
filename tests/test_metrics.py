"""The shipped `evaluate` metric modules against the official ISIC challenge scorer (`isic-challenge-scoring`)."""

import math
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import evaluate
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import LABELS, REPO_ROOT
from isic_challenge_scoring import metrics as isic_metrics
from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore
from isic_challenge_scoring.segmentation import SegmentationScore
from PIL import Image

from modeling_skinlesion.metrics import METRICS, metric_path

ISIC2019_LABELS = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
SEGMENTATION_KEYS = ["dice", "jaccard", "thresholded_jaccard", "sensitivity", "specificity", "accuracy"]
# Our key -> the official scorer's key.
OFFICIAL_SEGMENTATION_KEYS = {key: key for key in SEGMENTATION_KEYS} | {"thresholded_jaccard": "threshold_jaccard"}


@pytest.fixture(scope="module")
def segmentation_metric():
    return evaluate.load(metric_path("lesion_segmentation"))


@pytest.fixture(scope="module")
def classification_metric():
    return evaluate.load(metric_path("lesion_classification"))


# ------------------------------------------------------------------------------------------------------------------
# Segmentation
# ------------------------------------------------------------------------------------------------------------------
def _morph(mask: np.ndarray, radius: int, dilate: bool) -> np.ndarray:
    tensor = torch.from_numpy(mask).float()[None, None]
    if not dilate:
        tensor = 1 - tensor
    tensor = F.max_pool2d(tensor, 2 * radius + 1, stride=1, padding=radius)
    if not dilate:
        tensor = 1 - tensor
    return tensor[0, 0].numpy() > 0.5


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    shifted = np.zeros_like(mask)
    height, width = mask.shape
    shifted[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = mask[
        max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return shifted


def _real_mask_pairs(data_root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prediction, reference) pairs: real HAM10000 and ISIC 2017 reference masks against perturbed versions of
    themselves (eroded, dilated, shifted, empty, full), plus empty and full references."""
    rng = np.random.default_rng(0)
    files = sorted((data_root / "ham10000" / "masks").glob("*_segmentation.png"))
    files = [files[i] for i in rng.choice(len(files), 24, replace=False)]
    files += sorted((data_root / "isic2017" / "masks").glob("*_segmentation.png"))[:6]
    pairs = []
    for i, file in enumerate(files):
        reference = np.asarray(Image.open(file).convert("L")) > 128
        radius = 1 + i % 4 if reference.shape[0] < 300 else 4 + 4 * (i % 3)
        variants = [
            _morph(reference, radius, dilate=False),
            _morph(reference, radius, dilate=True),
            _shift(reference, int(rng.integers(-40, 40)), int(rng.integers(-40, 40))),
            _shift(_morph(reference, radius, dilate=i % 2 == 0), 3 * radius, -2 * radius),
        ]
        pairs.extend((variant, reference) for variant in variants)
        if i % 6 == 0:
            pairs.append((np.zeros_like(reference), reference))  # empty prediction
            pairs.append((np.ones_like(reference), reference))  # everything predicted
            pairs.append((np.zeros_like(reference), np.zeros_like(reference)))  # both empty
            pairs.append((reference, np.zeros_like(reference)))  # lesion predicted on an empty reference
            pairs.append((_morph(reference, radius, dilate=False), np.ones_like(reference)))  # full reference
    return pairs


def _official_segmentation(pairs: list[tuple[np.ndarray, np.ndarray]], tmp_path: Path) -> pd.Series:
    """Score `pairs` with the official scorer from PNG folders, as a challenge submission is scored."""
    truth_dir, prediction_dir = tmp_path / "truth", tmp_path / "prediction"
    truth_dir.mkdir()
    prediction_dir.mkdir()
    for i, (prediction, reference) in enumerate(pairs):
        image_id = f"ISIC_{9000000 + i:07d}"
        Image.fromarray(reference.astype(np.uint8) * 255).save(truth_dir / f"{image_id}_segmentation.png")
        Image.fromarray(prediction.astype(np.uint8) * 255).save(prediction_dir / f"{image_id}_segmentation.png")
    return SegmentationScore.from_dir(truth_dir, prediction_dir).macro_average


@pytest.mark.slow
def test_segmentation_agrees_with_official_scorer_on_real_masks(data_root, segmentation_metric, tmp_path):
    pairs = _real_mask_pairs(data_root)
    assert len({reference.shape for _, reference in pairs}) > 1  # HAM10000 and ISIC 2017 sizes mixed
    official = _official_segmentation(pairs, tmp_path)
    # Fed in uneven batches, mixing booleans and 0/255 uint8.
    for start in range(0, len(pairs), 7):
        chunk = pairs[start : start + 7]
        segmentation_metric.add_batch(
            predictions=[p.astype(np.uint8) * 255 for p, _ in chunk], references=[r for _, r in chunk]
        )
    ours = segmentation_metric.compute()
    assert ours["num_images"] == len(pairs)
    for key, official_key in OFFICIAL_SEGMENTATION_KEYS.items():
        assert abs(ours[key] - official[official_key]) < 1e-6, (key, ours[key], official[official_key])
    # The perturbations span the interesting range: some images fall under the 0.65 Jaccard threshold.
    assert ours["thresholded_jaccard"] < ours["jaccard"] < ours["dice"] < 1.0


def test_segmentation_scores_of_two_small_masks_by_hand(segmentation_metric):
    # Image A (4 x 4): the reference is a 2 x 2 square, the prediction a 2 x 3 rectangle around it:
    #   TP 4, FP 2, FN 0, TN 10 -> dice 8/10, jaccard 4/6, sensitivity 1, specificity 10/12, accuracy 14/16.
    # Image B (4 x 4): two 3 x 3 squares offset by one pixel diagonally, overlapping in 2 x 2:
    #   TP 4, FP 5, FN 5, TN 2 -> dice 8/18, jaccard 4/14, sensitivity 4/9, specificity 2/7, accuracy 6/16.
    # Scores are macro averages over the two images; B's Jaccard is under 0.65, so it thresholds to 0.
    reference_a, prediction_a = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    reference_a[1:3, 1:3] = True
    prediction_a[1:3, 1:4] = True
    reference_b, prediction_b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    reference_b[0:3, 0:3] = True
    prediction_b[1:4, 1:4] = True
    result = segmentation_metric.compute(
        predictions=[prediction_a, prediction_b], references=[reference_a, reference_b]
    )
    expected = {
        "dice": (8 / 10 + 8 / 18) / 2,
        "jaccard": (4 / 6 + 4 / 14) / 2,
        "thresholded_jaccard": (4 / 6 + 0) / 2,
        "sensitivity": (1 + 4 / 9) / 2,
        "specificity": (10 / 12 + 2 / 7) / 2,
        "accuracy": (14 / 16 + 6 / 16) / 2,
    }
    assert result == pytest.approx(expected | {"num_images": 2}, abs=1e-12)


def test_segmentation_empty_mask_conventions(segmentation_metric):
    empty = np.zeros((5, 5), dtype=bool)
    full = np.ones((5, 5), dtype=bool)
    lesion = np.zeros((5, 5), dtype=bool)
    lesion[1:4, 1:4] = True
    both_empty = segmentation_metric.compute(predictions=[empty], references=[empty])
    assert both_empty == {key: 1.0 for key in SEGMENTATION_KEYS} | {"num_images": 1}
    missed = segmentation_metric.compute(predictions=[empty], references=[lesion])
    assert missed["dice"] == missed["jaccard"] == missed["sensitivity"] == 0.0
    assert missed["specificity"] == 1.0 and missed["accuracy"] == pytest.approx(16 / 25)
    false_alarm = segmentation_metric.compute(predictions=[lesion], references=[empty])
    assert false_alarm["dice"] == 0.0 and false_alarm["sensitivity"] == 1.0
    assert false_alarm["specificity"] == pytest.approx(16 / 25)
    all_lesion = segmentation_metric.compute(predictions=[lesion], references=[full])
    assert all_lesion["specificity"] == 1.0 and all_lesion["sensitivity"] == pytest.approx(9 / 25)
    # Thresholded Jaccard: 9/16 < 0.65 scores 0; a custom threshold keeps it.
    grown = np.zeros((5, 5), dtype=bool)
    grown[1:5, 1:5] = True
    result = segmentation_metric.compute(predictions=[grown], references=[lesion])
    assert result["jaccard"] == pytest.approx(9 / 16) and result["thresholded_jaccard"] == 0.0
    result = segmentation_metric.compute(predictions=[grown], references=[lesion], jaccard_threshold=0.5)
    assert result["thresholded_jaccard"] == pytest.approx(9 / 16)


def test_segmentation_accepts_tensors_and_stacked_arrays(segmentation_metric):
    rng = np.random.default_rng(1)
    references = rng.random((3, 16, 12)) > 0.5
    predictions = rng.random((3, 16, 12)) > 0.5
    from_numpy = segmentation_metric.compute(predictions=predictions, references=references)
    from_torch = segmentation_metric.compute(
        predictions=torch.from_numpy(predictions).float()[:, None], references=torch.from_numpy(references)
    )
    assert from_numpy == from_torch


@pytest.mark.parametrize(
    ("prediction", "reference", "message"),
    [
        (np.full((4, 4), 0.7), np.zeros((4, 4)), "binary mask"),
        (np.zeros((4, 4)), np.zeros((4, 5)), "resize the prediction"),
        (np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), "2-D mask"),
    ],
)
def test_segmentation_rejects_bad_masks(segmentation_metric, prediction, reference, message):
    with pytest.raises(ValueError, match=message):
        segmentation_metric.add_batch(predictions=[prediction], references=[reference])


def test_segmentation_rejects_a_single_mask_and_mismatched_counts(segmentation_metric):
    with pytest.raises(ValueError, match="one mask per image"):
        segmentation_metric.add_batch(predictions=np.zeros((4, 4)), references=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        segmentation_metric.add_batch(predictions=[np.zeros((4, 4))] * 2, references=[np.zeros((4, 4))])


# ------------------------------------------------------------------------------------------------------------------
# Classification
# ------------------------------------------------------------------------------------------------------------------
def _dirichlet_predictions(num_classes: int, seed: int, size: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced references and probabilities that lean towards the reference class, like a weak classifier."""
    rng = np.random.default_rng(seed)
    prior = np.linspace(3, 1, num_classes) ** 2
    labels = rng.choice(num_classes, size=size, p=prior / prior.sum())
    labels[:num_classes] = np.arange(num_classes)  # every class present
    concentration = np.ones((size, num_classes))
    concentration[np.arange(size), labels] += rng.uniform(0, 3, size)
    probabilities = np.stack([rng.dirichlet(alpha) for alpha in concentration])
    return probabilities, labels


def _official_classification(probabilities: np.ndarray, labels: np.ndarray, names: list[str]) -> ClassificationScore:
    index = pd.Index([f"ISIC_{i:07d}" for i in range(len(labels))], name="image")
    truth = pd.DataFrame(np.eye(len(names))[labels], index=index, columns=names)
    prediction = pd.DataFrame(probabilities, index=index, columns=names)
    weights = pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=index)
    return ClassificationScore(truth, prediction, weights, ClassificationMetric.BALANCED_ACCURACY)


@pytest.mark.parametrize(("names", "seed"), [(LABELS, 0), (ISIC2019_LABELS, 1)])
def test_classification_agrees_with_official_scorer(classification_metric, names, seed):
    probabilities, labels = _dirichlet_predictions(len(names), seed)
    official = _official_classification(probabilities, labels, names)
    for start in range(0, len(labels), 128):
        classification_metric.add_batch(
            predictions=probabilities[start : start + 128], references=labels[start : start + 128]
        )
    ours = classification_metric.compute(label_names=names)
    assert abs(ours["balanced_accuracy"] - official.aggregate["balanced_accuracy"]) < 1e-6
    assert abs(ours["macro_auc"] - official.macro_average["auc"]) < 1e-6
    for name in names:
        assert abs(ours["per_class_auc"][name] - official.per_category.loc[name, "auc"]) < 1e-6
    # Top-1 per-class sensitivity is per-class recall: its mean is the balanced accuracy.
    assert np.mean(list(ours["per_class_sensitivity"].values())) == pytest.approx(ours["balanced_accuracy"], abs=1e-12)
    assert ours["accuracy"] == pytest.approx(np.mean(probabilities.argmax(1) == labels), abs=1e-12)

    thresholded = classification_metric.compute(
        predictions=probabilities, references=labels, label_names=names, decision="threshold"
    )
    for name in names:
        for key in ("sensitivity", "specificity"):
            assert abs(thresholded[f"per_class_{key}"][name] - official.per_category.loc[name, key]) < 1e-6


def test_classification_scores_of_six_samples_by_hand(classification_metric):
    probabilities = [
        [0.7, 0.2, 0.1],  # class 0, decided 0
        [0.2, 0.5, 0.3],  # class 0, decided 1
        [0.1, 0.8, 0.1],  # class 1, decided 1
        [0.3, 0.3, 0.4],  # class 2, decided 2
        [0.6, 0.3, 0.1],  # class 2, decided 0
        [0.2, 0.2, 0.6],  # class 2, decided 2
    ]
    result = classification_metric.compute(predictions=probabilities, references=[0, 0, 1, 2, 2, 2])
    assert result["accuracy"] == pytest.approx(4 / 6)
    # Recall per class: 1/2, 1/1, 2/3.
    assert result["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert result["per_class_sensitivity"] == pytest.approx({"0": 1 / 2, "1": 1.0, "2": 2 / 3})
    # Specificity of class 0: of the four samples of other classes, one (the fifth) is decided 0.
    assert result["per_class_specificity"]["0"] == pytest.approx(3 / 4)
    # AUC of class 0: positives score 0.7 and 0.2, negatives 0.1, 0.3, 0.6, 0.2. 0.7 beats all four; 0.2 beats 0.1
    # and ties 0.2 (half a pair): 5.5 of 8 pairs. Class 1: its one positive (0.8) beats all five negatives.
    assert result["per_class_auc"]["0"] == pytest.approx(5.5 / 8)
    assert result["per_class_auc"]["1"] == 1.0


def test_classification_top1_rates_match_confusion_matrix(classification_metric):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    probabilities, labels = _dirichlet_predictions(7, seed=3)
    result = classification_metric.compute(predictions=probabilities, references=labels)
    confusion = sklearn_metrics.confusion_matrix(labels, probabilities.argmax(1), labels=range(7))
    for c in range(7):
        tp = confusion[c, c]
        fn = confusion[c].sum() - tp
        fp = confusion[:, c].sum() - tp
        tn = confusion.sum() - tp - fn - fp
        assert result["per_class_sensitivity"][str(c)] == pytest.approx(tp / (tp + fn), abs=1e-12)
        assert result["per_class_specificity"][str(c)] == pytest.approx(tn / (tn + fp), abs=1e-12)


def test_classification_ties_count_as_undecided_like_official(classification_metric):
    probabilities, labels = _dirichlet_predictions(4, seed=4, size=40)
    probabilities[5] = [0.4, 0.4, 0.1, 0.1]
    labels[5] = 0
    probabilities[6] = [0.25, 0.25, 0.25, 0.25]
    names = list("ABCD")
    official = _official_classification(probabilities, labels, names)
    ours = classification_metric.compute(predictions=probabilities, references=labels, label_names=names)
    assert abs(ours["balanced_accuracy"] - official.aggregate["balanced_accuracy"]) < 1e-6
    decided = probabilities.argmax(1)
    decided[[5, 6]] = -1
    assert ours["accuracy"] == pytest.approx(np.mean(decided == labels))


def test_classification_absent_class_is_a_documented_difference(classification_metric):
    probabilities, labels = _dirichlet_predictions(5, seed=5, size=200)
    labels[labels == 3] = 0  # class "D" never occurs
    names = list("ABCDE")
    ours = classification_metric.compute(predictions=probabilities, references=labels, label_names=names)
    # The official scorer cannot score such a set as a whole (its partial AUC above 80% sensitivity fails) ...
    with pytest.raises(ValueError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _official_classification(probabilities, labels, names)
    # ... and its AUC of the absent class is NaN (scikit-learn >= 1.6); ours is None and the macro AUC averages the
    # other classes, each of which agrees with the official function.
    truth, prediction = pd.DataFrame(np.eye(5)[labels], columns=names), pd.DataFrame(probabilities, columns=names)
    weights = pd.Series(1.0, index=truth.index)
    with pytest.warns(UserWarning, match="Only one class"):
        assert math.isnan(isic_metrics.auc(truth["D"], prediction["D"], weights))
    assert ours["per_class_auc"]["D"] is None
    official_aucs = [isic_metrics.auc(truth[name], prediction[name], weights) for name in names if name != "D"]
    assert [ours["per_class_auc"][name] for name in names if name != "D"] == pytest.approx(official_aucs, abs=1e-6)
    assert abs(ours["macro_auc"] - np.mean(official_aucs)) < 1e-6
    # Balanced accuracy skips the absent class in both (the official 0/0 recall is a NaN that its mean skips).
    official_balanced = isic_metrics.balanced_multiclass_accuracy(truth, prediction, weights)
    assert abs(ours["balanced_accuracy"] - official_balanced) < 1e-6
    # The absent class's sensitivity is the official "freebie" 1.0.
    assert ours["per_class_sensitivity"]["D"] == 1.0


def test_expected_calibration_error(classification_metric):
    # Hand-computed: confidences 0.9 (right), 0.8 (wrong) and 0.55 (right), in bins 14, 12 and 9 of 15.
    result = classification_metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8], [0.55, 0.45]], references=[0, 0, 0])
    assert result["ece"] == pytest.approx((0.1 + 0.8 + 0.45) / 3)
    # Labels drawn from the predicted distribution are calibrated; sharpened probabilities are over-confident.
    rng = np.random.default_rng(6)
    probabilities = rng.dirichlet(np.ones(4), size=20000)
    labels = np.array([rng.choice(4, p=p) for p in probabilities])
    calibrated = classification_metric.compute(predictions=probabilities, references=labels)["ece"]
    sharpened = probabilities**4 / (probabilities**4).sum(axis=1, keepdims=True)
    overconfident = classification_metric.compute(predictions=sharpened, references=labels)["ece"]
    assert calibrated < 0.02 < 0.1 < overconfident


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"predictions": [[0.5, 0.6], [0.5, 0.5]], "references": [0, 1]}, "sum to 1"),
        ({"predictions": [[2.0, -1.0], [0.5, 0.5]], "references": [0, 1]}, "softmax"),
        ({"predictions": [[0.5, 0.5], [0.5, 0.5]], "references": [0, 2]}, r"lie in \[0, 2\)"),
        ({"predictions": [[0.5, 0.5]], "references": [0], "label_names": ["a"]}, "2 distinct names"),
        ({"predictions": [[0.5, 0.5]], "references": [0], "decision": "top2"}, "'argmax' or 'threshold'"),
    ],
)
def test_classification_rejects_bad_input(classification_metric, kwargs, message):
    with pytest.raises(ValueError, match=message):
        classification_metric.compute(**kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Shipping
# ------------------------------------------------------------------------------------------------------------------
def test_metric_path_names_the_shipped_modules():
    for name in METRICS:
        assert (Path(metric_path(name)) / f"{name}.py").is_file()
    with pytest.raises(ValueError, match="lesion_segmentation"):
        metric_path("dice")


@pytest.mark.slow
def test_wheel_ships_the_metric_modules(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT / "modeling_skinlesion", source / "modeling_skinlesion")
    shutil.copy(REPO_ROOT / "pyproject.toml", source)
    readme = REPO_ROOT / "README.md"
    (source / "README.md").write_text(readme.read_text() if readme.is_file() else "skin-dualnet\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in METRICS:
        assert f"modeling_skinlesion/metrics/{name}/{name}.py" in names
    assert "modeling_skinlesion/metrics/__init__.py" in names
