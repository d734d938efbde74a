"""Lesion segmentation metric: Dice, Jaccard, thresholded Jaccard, sensitivity, specificity and pixel accuracy.

Every score is computed per image from that image's binary confusion matrix and then macro-averaged over the
images, with the conventions of the official ISIC challenge scorer (`isic-challenge-scoring`, ISIC 2016-2018
Task 1), so the numbers agree with it to floating-point precision.
"""

import struct

import datasets
import evaluate
import numpy as np

from modeling_skinlesion.metrics import ISIC_CITATION, ISIC_SCORER_URL

_DESCRIPTION = """
Per-image binary lesion-mask scores, macro-averaged over images, exactly as the ISIC challenge scored Task 1
(lesion boundary segmentation):

- dice = 2 TP / (2 TP + FP + FN)
- jaccard = TP / (TP + FP + FN)
- thresholded_jaccard = jaccard if jaccard >= 0.65 else 0 (the ISIC 2018 Task 1 ranking metric)
- sensitivity = TP / (TP + FN)
- specificity = TN / (TN + FP)
- accuracy = (TP + TN) / (TP + TN + FP + FN)

Empty-mask conventions (those of the official scorer):
- reference and prediction both empty: dice = jaccard = thresholded_jaccard = 1 (a perfect answer);
- reference empty (no lesion pixel): sensitivity = 1;
- reference full (no background pixel): specificity = 1.
An empty prediction on a non-empty reference scores dice = jaccard = sensitivity = 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D arrays, or one array of shape `(num_images, height, width)`):
        Predicted binary masks, one per image. numpy arrays, torch tensors, PIL images and nested lists are accepted;
        values must be boolean, 0/1 or 0/255 (non-zero = lesion). Singleton dimensions (e.g. `(1, height, width)`)
        are squeezed. Sizes may differ between images.
    references (same form as `predictions`):
        Ground-truth binary masks, each the same size as its prediction.
    jaccard_threshold (`float`, *optional*, defaults to 0.65):
        Threshold of `thresholded_jaccard`.
Returns:
    `dict` with `dice`, `jaccard`, `thresholded_jaccard`, `sensitivity`, `specificity`, `accuracy` (macro averages
    over images) and `num_images`.
Examples:
    >>> import numpy as np
    >>> metric = evaluate.load(metric_path("lesion_segmentation"))
    >>> reference = np.zeros((4, 4), dtype=bool); reference[1:3, 1:3] = True
    >>> prediction = np.zeros((4, 4), dtype=bool); prediction[1:3, 1:4] = True
    >>> metric.compute(predictions=[prediction], references=[reference])["dice"]
    0.8
"""

# Masks are stored bit-packed behind a small header (height, width as two little-endian uint32), so a cache of
# 768x576 masks costs 55 kB per image instead of a nested list of Python booleans.
_HEADER = struct.Struct("<II")


def _to_mask(mask, name: str) -> np.ndarray:
    """One binary mask as a boolean array of shape (height, width), or a `ValueError` naming `name`."""
    if hasattr(mask, "detach"):  # torch tensor, without importing torch here
        mask = mask.detach().cpu().numpy()
    array = np.asarray(mask)
    if array.ndim > 2:
        array = np.squeeze(array)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D mask (height, width), got shape {array.shape}.")
    if array.dtype == np.bool_:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must hold booleans or numbers, got dtype {array.dtype}.")
    values = np.unique(array)
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        shown = values[:6].tolist()
        raise ValueError(
            f"{name} must be a binary mask with values 0/1 or 0/255 (or booleans), got values {shown}"
            f"{' ...' if len(values) > 6 else ''}; threshold probabilities first (e.g. `probabilities > 0.5`)."
        )
    return array != 0


def _pack(mask: np.ndarray) -> bytes:
    return _HEADER.pack(*mask.shape) + np.packbits(mask, axis=None).tobytes()


def _unpack(data: bytes) -> np.ndarray:
    height, width = _HEADER.unpack_from(data)
    bits = np.frombuffer(data, dtype=np.uint8, offset=_HEADER.size)
    return np.unpackbits(bits, count=height * width).reshape(height, width).astype(bool)


def _as_list(masks, name: str) -> list:
    if masks is None:
        raise ValueError(f"`{name}` is required: a list of 2-D binary masks, one per image.")
    if hasattr(masks, "detach"):
        masks = masks.detach().cpu().numpy()
    if isinstance(masks, np.ndarray):
        if masks.ndim == 2:
            raise ValueError(
                f"`{name}` is a single 2-D mask of shape {masks.shape}; pass a list with one mask per image."
            )
        return list(masks)
    return list(masks)


def confusion_counts(prediction: np.ndarray, reference: np.ndarray) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) of two boolean masks of the same shape."""
    tp = int(np.count_nonzero(prediction & reference))
    fp = int(np.count_nonzero(prediction & ~reference))
    fn = int(np.count_nonzero(~prediction & reference))
    return tp, fp, fn, prediction.size - tp - fp - fn


def image_scores(tp: int, fp: int, fn: int, tn: int, jaccard_threshold: float = 0.65) -> dict[str, float]:
    """The six per-image scores from one confusion matrix, with the official scorer's empty-mask conventions."""
    union = tp + fp + fn
    jaccard = tp / union if union else 1.0
    return {
        "dice": 2 * tp / (2 * tp + fp + fn) if union else 1.0,
        "jaccard": jaccard,
        "thresholded_jaccard": jaccard if jaccard >= jaccard_threshold else 0.0,
        "sensitivity": tp / (tp + fn) if tp + fn else 1.0,
        "specificity": tn / (tn + fp) if tn + fp else 1.0,
        "accuracy": (tp + tn) / (tp + fp + fn + tn),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LesionSegmentation(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        # Each mask arrives bit-packed (see `add_batch`): one binary blob per image, whatever its size.
        mask = datasets.Value("binary")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=ISIC_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": mask, "references": mask}),
            reference_urls=[ISIC_SCORER_URL],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        """Check and store a batch of masks (one prediction and one reference per image)."""
        predictions = _as_list(predictions, "predictions")
        references = _as_list(references, "references")
        if len(predictions) != len(references):
            raise ValueError(
                f"Got {len(predictions)} predictions but {len(references)} references; pass one of each per image."
            )
        packed_predictions, packed_references = [], []
        for i, (prediction, reference) in enumerate(zip(predictions, references)):
            prediction = _to_mask(prediction, f"predictions[{i}]")
            reference = _to_mask(reference, f"references[{i}]")
            if prediction.shape != reference.shape:
                raise ValueError(
                    f"predictions[{i}] has shape {prediction.shape} but references[{i}] has {reference.shape}; "
                    "resize the prediction to its reference's size (nearest) before scoring."
                )
            packed_predictions.append(_pack(prediction))
            packed_references.append(_pack(reference))
        super().add_batch(predictions=packed_predictions, references=packed_references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs) -> None:
        """Check and store the masks of one image."""
        if prediction is None or reference is None:
            raise ValueError("`prediction` and `reference` are both required: one 2-D binary mask each.")
        self.add_batch(predictions=[prediction], references=[reference], **kwargs)

    def _compute(self, predictions, references, jaccard_threshold: float = 0.65) -> dict[str, float]:
        if not 0.0 <= jaccard_threshold <= 1.0:
            raise ValueError(f"`jaccard_threshold` must lie in [0, 1], got {jaccard_threshold}.")
        if len(predictions) == 0:
            raise ValueError("No masks to score: call `add_batch` (or pass `predictions`/`references`) first.")
        per_image = [
            image_scores(*confusion_counts(_unpack(p), _unpack(r)), jaccard_threshold=jaccard_threshold)
            for p, r in zip(predictions, references)
        ]
        result = {key: float(np.mean([scores[key] for scores in per_image])) for key in per_image[0]}
        result["num_images"] = len(per_image)
        return result
