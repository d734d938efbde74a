"""Lesion classification metric: accuracy, balanced multiclass accuracy, ROC AUC, per-class sensitivity and
specificity, and expected calibration error, from predicted class probabilities.

Balanced accuracy, ROC AUC and the per-class scores follow the official ISIC challenge scorer
(`isic-challenge-scoring`, ISIC 2018 Task 3 / ISIC 2019) and agree with it to floating-point precision; the
differences are listed in `_DESCRIPTION`.
"""

import datasets
import evaluate
import numpy as np

from modeling_skinlesion.metrics import ISIC_CITATION, ISIC_SCORER_URL

_DESCRIPTION = """
Scores a multiclass classifier from its probability vectors:

- accuracy: fraction of samples whose highest-probability class is the reference class.
- balanced_accuracy: mean over the classes present in the references of the per-class recall of that top-1
  decision ("balanced multiclass accuracy", the ISIC 2018 Task 3 and ISIC 2019 ranking metric).
- macro_auc, per_class_auc: one-vs-rest ROC AUC of each class's probability (ties count one half, as in
  `sklearn.metrics.roc_auc_score`), and their mean.
- per_class_sensitivity, per_class_specificity: one-vs-rest sensitivity TP / (TP + FN) and specificity
  TN / (TN + FP) of each class. With `decision="argmax"` (the default) a sample is predicted positive for the class
  it is assigned to (top-1), so the mean sensitivity over the classes present equals `balanced_accuracy`. With
  `decision="threshold"` a sample is positive for every class whose probability exceeds 0.5: this is what the
  official scorer reports per category.
- ece: expected calibration error of the top-1 confidence (the largest probability of each sample) over 15
  equal-width bins (0, 1/15], (1/15, 2/15], ..., (14/15, 1]: the sum over bins of
  (samples in bin / all samples) * |accuracy in bin - mean confidence in bin| (Guo et al., 2017).

Conventions shared with the official scorer:
- a sample whose largest probability is shared by several classes is "undecided": it counts as wrong for
  accuracy, balanced accuracy, ECE and the argmax sensitivity / specificity;
- sensitivity is 1 for a class with no positive reference, specificity is 1 for a class with no negative one.

Differences from the official scorer:
- a class with no positive (or no negative) reference has no ROC AUC: the official scorer's AUC function returns
  NaN for it (scikit-learn >= 1.6; older versions raise) and its full score fails on such a set; here its
  `per_class_auc` is `None` (valid JSON) and `macro_auc` averages the classes that have one;
- `accuracy` (multiclass top-1) and `ece` are not computed by the official scorer;
- its per-category sensitivity / specificity use the 0.5 threshold: pass `decision="threshold"` to reproduce them.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list[float]`, or an array of shape `(num_samples, num_classes)`):
        Class probabilities (e.g. a softmax), each row in [0, 1] and summing to 1.
    references (`list[int]`):
        Reference class indices in [0, num_classes).
    label_names (`list[str]`, *optional*):
        Names of the classes, used as keys of the per-class results (default: "0", "1", ...).
    decision (`str`, *optional*, defaults to `"argmax"`):
        How per-class sensitivity / specificity decide a positive: `"argmax"` (top-1 class) or `"threshold"`
        (probability > 0.5, as the official ISIC scorer).
Returns:
    `dict` with `accuracy`, `balanced_accuracy`, `macro_auc`, `ece` (floats), `per_class_auc`,
    `per_class_sensitivity`, `per_class_specificity` (dicts keyed by label name) and `num_samples`.
Examples:
    >>> metric = evaluate.load(metric_path("lesion_classification"))
    >>> result = metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], references=[0, 1, 1])
    >>> result["accuracy"], result["balanced_accuracy"], result["macro_auc"]
    (0.6666666666666666, 0.75, 1.0)
"""

_CITATION = (
    ISIC_CITATION
    + """
@inproceedings{guo2017calibration,
  title={On Calibration of Modern Neural Networks},
  author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  booktitle={ICML},
  year={2017}
}
"""
)

ECE_BINS = 15
UNDECIDED = -1


def decide(probabilities: np.ndarray) -> np.ndarray:
    """Top-1 class of each row, or `UNDECIDED` (-1) where the largest probability is shared by several classes."""
    top = probabilities.argmax(axis=1)
    tied = (probabilities == probabilities.max(axis=1, keepdims=True)).sum(axis=1) > 1
    return np.where(tied, UNDECIDED, top)


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); `None` without both classes."""
    num_positive = int(positive.sum())
    num_negative = positive.size - num_positive
    if num_positive == 0 or num_negative == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mid_ranks = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank of each distinct score, ties averaged
    ranks = mid_ranks[inverse]
    return float((ranks[positive].sum() - num_positive * (num_positive + 1) / 2.0) / (num_positive * num_negative))


def binary_rates(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """(sensitivity, specificity) of boolean arrays, 1.0 where undefined (the official scorer's convention)."""
    tp = np.count_nonzero(truth & predicted)
    fn = np.count_nonzero(truth & ~predicted)
    tn = np.count_nonzero(~truth & ~predicted)
    fp = np.count_nonzero(~truth & predicted)
    return (tp / (tp + fn) if tp + fn else 1.0), (tn / (tn + fp) if tn + fp else 1.0)


def expected_calibration_error(probabilities: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of the top-1 confidence over `bins` equal-width bins (lo, hi]; a confidence of 0 joins the first bin."""
    confidence = probabilities.max(axis=1)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    error = 0.0
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)


def _check_inputs(predictions, references, label_names) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        probabilities = np.asarray(predictions, dtype=np.float64)
    except ValueError as error:
        raise ValueError(f"`predictions` must be rows of class probabilities of equal length: {error}") from None
    if probabilities.ndim != 2 or probabilities.shape[1] < 2:
        raise ValueError(
            f"`predictions` must have shape (num_samples, num_classes) with at least 2 classes, got "
            f"{probabilities.shape}."
        )
    if not np.isfinite(probabilities).all() or probabilities.min() < 0 or probabilities.max() > 1:
        raise ValueError("`predictions` must be probabilities in [0, 1]; apply a softmax to the logits first.")
    sums = probabilities.sum(axis=1)
    if np.abs(sums - 1).max() > 1e-3:
        row = int(np.abs(sums - 1).argmax())
        raise ValueError(
            f"Each row of `predictions` must sum to 1 (row {row} sums to {sums[row]:.4f}); apply a softmax over the "
            "classes."
        )
    labels = np.asarray(references)
    num_classes = probabilities.shape[1]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"`references` must be a list of integer class indices, got {labels.dtype} {labels.shape}.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"`references` must lie in [0, {num_classes}) for {num_classes}-class predictions, got values "
            f"{sorted(set(labels.tolist()) - set(range(num_classes)))[:5]}."
        )
    if label_names is None:
        label_names = [str(i) for i in range(num_classes)]
    label_names = [str(name) for name in label_names]
    if len(label_names) != num_classes or len(set(label_names)) != num_classes:
        raise ValueError(f"`label_names` must hold {num_classes} distinct names (one per class), got {label_names}.")
    return probabilities, labels, label_names


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LesionClassification(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.List(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
            reference_urls=[ISIC_SCORER_URL],
        )

    def _compute(
        self, predictions, references, label_names: list[str] | None = None, decision: str = "argmax"
    ) -> dict:
        if decision not in ("argmax", "threshold"):
            raise ValueError(f"`decision` must be 'argmax' or 'threshold', got {decision!r}.")
        if len(predictions) == 0:
            raise ValueError("No predictions to score: call `add_batch` (or pass `predictions`/`references`) first.")
        probabilities, labels, label_names = _check_inputs(predictions, references, label_names)
        decided = decide(probabilities)
        correct = decided == labels

        recalls = [correct[labels == c].mean() for c in range(len(label_names)) if (labels == c).any()]
        per_class_auc, sensitivity, specificity = {}, {}, {}
        for c, name in enumerate(label_names):
            truth = labels == c
            predicted = decided == c if decision == "argmax" else probabilities[:, c] > 0.5
            per_class_auc[name] = roc_auc(truth, probabilities[:, c])
            sensitivity[name], specificity[name] = (float(v) for v in binary_rates(truth, predicted))
        aucs = [value for value in per_class_auc.values() if value is not None]
        return {
            "accuracy": float(correct.mean()),
            "balanced_accuracy": float(np.mean(recalls)),
            "macro_auc": float(np.mean(aucs)) if aucs else None,
            "ece": expected_calibration_error(probabilities, correct),
            "per_class_auc": per_class_auc,
            "per_class_sensitivity": sensitivity,
            "per_class_specificity": specificity,
            "num_samples": int(labels.size),
        }
