"""When not to trust the classifier, and what to do with its answer when it can be trusted (package-only).

- **Out-of-distribution gate**: class-conditional Gaussians with one shared (tied) covariance on the classifier's own
  features (Lee et al., 2018, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
  Attacks"). `fit_mahalanobis` fits them on training-split features; `fit_ood_gate` stores them in a `SkinDualNet` as
  buffers and sets the threshold on validation-split scores, so the forward computes `ood_score` /
  `in_distribution` itself (`SkinDualNet.ood_scores`, in the shipped remote code).
- **Referral operating point**: `malignancy_scores` sums the calibrated probabilities of the config's malignant
  classes; `fit_referral` fixes the threshold that reaches a sensitivity on malignant lesions of the validation split.
- **Selective prediction**: `risk_coverage` (balanced error of the kept cases as the least confident are set aside)
  and its area.
- **OOD metrics** in the OpenOOD convention (`ood_metrics`: AUROC, FPR at 95 % TPR, in-distribution positive).

Nothing here is shipped as remote code: fitting needs the data, the forward needs only the stored statistics.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .configuration_skinlesion import OOD_FEATURES
from .modeling_skinlesion import energy_score, mahalanobis_score


def collect_outputs(
    model: Any, items: Iterable[tuple[Any, Mapping[str, Any] | None]], batch_size: int = 32
) -> dict[str, np.ndarray]:
    """Run `(image, metadata record)` pairs through the model's ordinary forward (its image processor, its own lesion
    masks: what the pipeline runs) and keep, per image, the gate's features (`"fused"`: the pooled image and lesion
    embeddings), the calibrated probabilities and `mask_empty`."""
    from .image_processing_skinlesion import SkinLesionImageProcessor, SkinLesionMetadataProcessor

    processor = SkinLesionImageProcessor.from_model_config(model.config)
    metadata_processor = SkinLesionMetadataProcessor.from_config(model.config)
    device = next(model.parameters()).device
    out: dict[str, list] = {"fused": [], "probabilities": [], "mask_empty": []}
    batch: list = []

    def flush() -> None:
        records = [metadata_processor.normalize_record(record) for _, record in batch]
        pixel_values = processor([image for image, _ in batch], return_tensors="pt")["pixel_values"].to(device)
        metadata = {key: value.to(device) for key, value in metadata_processor.encode(records).items()}
        with torch.inference_mode():
            output = model(pixel_values=pixel_values, **metadata)
        parts = [output.image_embeds] + ([output.lesion_embeds] if output.lesion_embeds is not None else [])
        out["fused"].append(torch.cat(parts, -1).float().cpu().numpy())
        out["probabilities"].append(output.logits.float().softmax(-1).cpu().numpy())
        empty = output.mask_empty if output.mask_empty is not None else torch.zeros(len(batch), dtype=torch.bool)
        out["mask_empty"].append(empty.cpu().numpy())
        batch.clear()

    was_training = model.training
    model.eval()
    try:
        for item in items:
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        model.train(was_training)
    if not out["fused"]:
        raise ValueError("No images to collect outputs from.")
    return {key: np.concatenate(value) for key, value in out.items()}


def dataset_items(dataset: Any) -> Iterable[tuple[Any, dict[str, Any]]]:
    """`(image, metadata record)` pairs of a dataset of this package's schema (`modeling_skinlesion.data`)."""
    for row in dataset:
        yield row["image"].convert("RGB"), {"age": row["age"], "sex": row["sex"], "site": row["site"]}


def fit_mahalanobis(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None, shrinkage: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means `(num_classes, dim)` and a whitening matrix `(dim, dim)` of the tied covariance, so that
    `||(f - mean_c) @ whitening||^2` is the Mahalanobis distance to class c.

    The covariance is shrunk towards its mean variance (`shrinkage` of it added on the diagonal) so that directions the
    training features never vary in do not dominate the distance. A class without training features gets no mean (its
    row is the overall mean)."""
    features = features.double()
    labels = labels.long()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"`features` must be (samples, dim) and `labels` (samples,), got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}."
        )
    means = features.mean(0, keepdim=True).repeat(num_classes, 1)
    for k in range(num_classes):
        if (labels == k).any():
            means[k] = features[labels == k].mean(0)
    centred = features - means[labels]
    covariance = centred.T @ centred / len(features)
    covariance += shrinkage * covariance.diagonal().mean() * torch.eye(len(covariance), dtype=covariance.dtype)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    whitening = eigenvectors / eigenvalues.clamp(min=1e-12).sqrt()
    return means.float(), whitening.float()


def ood_metrics(in_scores: np.ndarray, out_scores: np.ndarray) -> dict[str, float]:
    """OpenOOD convention: in-distribution is the positive class and a higher score means "more out of
    distribution". AUROC of telling the two apart, FPR at 95 % TPR (share of OOD images accepted when the threshold
    accepts 95 % of in-distribution ones), and the counts."""
    in_scores, out_scores = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    if not len(in_scores) or not len(out_scores):
        raise ValueError(f"Need scores on both sides, got {len(in_scores)} in and {len(out_scores)} out.")
    # AUROC as the probability that an OOD image scores above an in-distribution one (ties count half).
    order = np.concatenate([in_scores, out_scores])
    ranks = _average_ranks(order)
    rank_sum = ranks[len(in_scores) :].sum()
    auroc = (rank_sum - len(out_scores) * (len(out_scores) + 1) / 2) / (len(in_scores) * len(out_scores))
    threshold = np.quantile(in_scores, 0.95)
    return {
        "auroc": float(auroc),
        "fpr_at_95_tpr": float((out_scores <= threshold).mean()),
        "in_images": len(in_scores),
        "out_images": len(out_scores),
    }


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def fit_ood_gate(
    model: Any,
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    validation_features: torch.Tensor,
    accept_rate: float = 0.95,
    feature: str = "fused",
    fitted_on: str = "",
    shrinkage: float = 0.01,
) -> dict[str, Any]:
    """Fit the gate of a `SkinDualNet` in place: Gaussians on `train_features` (the model's `ood_features` of the
    training split, e.g. from `collect_outputs`), threshold at the `accept_rate` quantile of the validation scores.
    Returns what was fitted (threshold, validation acceptance, sizes) for the metrics file."""
    if not 0.5 <= accept_rate < 1.0:
        raise ValueError(f"`accept_rate` must lie in [0.5, 1), got {accept_rate}.")
    if feature not in OOD_FEATURES:
        raise ValueError(f"`feature` must be one of {OOD_FEATURES}, got {feature!r}.")
    means, whitening = fit_mahalanobis(train_features, train_labels, model.config.num_labels, shrinkage)
    scores = mahalanobis_score(validation_features.float(), means, whitening).numpy()
    threshold = float(np.quantile(scores, accept_rate))
    model.set_ood_gate(means, whitening, threshold, feature=feature, fitted_on=fitted_on)
    return {
        "method": "mahalanobis",
        "feature": feature,
        "threshold": threshold,
        "accept_rate_target": accept_rate,
        "validation_accepted": float((scores <= threshold).mean()),
        "train_images": len(train_features),
        "validation_images": len(validation_features),
        "shrinkage": shrinkage,
        "fitted_on": fitted_on,
    }


def malignancy_scores(probabilities: np.ndarray, labels: Sequence[str], malignant: Sequence[str]) -> np.ndarray:
    """Sum of the probabilities `(samples, classes)` of the `malignant` classes (names of `labels`)."""
    unknown = sorted(set(malignant) - set(labels))
    if unknown:
        raise ValueError(f"Malignant classes {unknown} are not labels of the model; its labels are {list(labels)}.")
    columns = [list(labels).index(name) for name in malignant]
    return np.asarray(probabilities, dtype=np.float64)[:, columns].sum(1)


def referral_point(scores: np.ndarray, malignant: np.ndarray, sensitivity: float) -> dict[str, float]:
    """The largest threshold whose sensitivity (share of malignant cases with `score >= threshold`) is at least
    `sensitivity`, with the sensitivity and specificity it gives on these cases."""
    scores, malignant = np.asarray(scores, dtype=np.float64), np.asarray(malignant, dtype=bool)
    if not malignant.any() or malignant.all():
        raise ValueError("The referral threshold needs both malignant and benign cases.")
    positives = np.sort(scores[malignant])[::-1]
    needed = int(np.ceil(sensitivity * len(positives)))  # this many malignant cases must be referred
    threshold = float(positives[max(needed, 1) - 1])
    return {"threshold": threshold, **referral_rates(scores, malignant, threshold)}


def referral_rates(scores: np.ndarray, malignant: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity and specificity of "refer when `score >= threshold`"."""
    scores, malignant = np.asarray(scores, dtype=np.float64), np.asarray(malignant, dtype=bool)
    refer = scores >= threshold
    return {
        "sensitivity": float(refer[malignant].mean()) if malignant.any() else float("nan"),
        "specificity": float((~refer[~malignant]).mean()) if (~malignant).any() else float("nan"),
        "referred": float(refer.mean()),
    }


def fit_referral(
    model: Any,
    probabilities: np.ndarray,
    labels: np.ndarray,
    sensitivity: float = 0.90,
    malignant_labels: Sequence[str] | None = None,
    fitted_on: str = "",
) -> dict[str, Any]:
    """Fix the referral threshold of a `SkinDualNet` in place on held-out cases: calibrated `probabilities`
    `(samples, classes)` and class indices `labels`. The malignant set is `malignant_labels`, else the config's."""
    config = model.config
    names = [config.id2label[i] for i in range(config.num_labels)]
    malignant_labels = list(malignant_labels or config.malignant_labels or [])
    if not malignant_labels:
        raise ValueError("No malignant classes: set `config.malignant_labels` or pass `malignant_labels`.")
    scores = malignancy_scores(probabilities, names, malignant_labels)
    is_malignant = np.isin(np.asarray(labels), [names.index(name) for name in malignant_labels])
    point = referral_point(scores, is_malignant, sensitivity)
    config.malignant_labels = malignant_labels
    config.referral_threshold = point["threshold"]
    config.referral_sensitivity = point["sensitivity"]
    config.referral_specificity = point["specificity"]
    config.referral_target_sensitivity = sensitivity
    config.referral_fitted_on = fitted_on
    return {
        **point,
        "target_sensitivity": sensitivity,
        "malignant_labels": malignant_labels,
        "images": len(scores),
        "malignant_images": int(is_malignant.sum()),
        "fitted_on": fitted_on,
    }


def risk_coverage(probabilities: np.ndarray, labels: np.ndarray, steps: int = 50) -> dict[str, Any]:
    """Selective prediction on `(samples, classes)` probabilities: the cases are kept most confident first (maximum
    probability); at each coverage the risk is the balanced error (1 - balanced accuracy over the classes present
    among the kept cases) and the plain error. AURC: the mean risk over the coverages (trapezoid rule)."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    confidence = probabilities.max(1)
    order = np.argsort(-confidence, kind="mergesort")
    correct = probabilities.argmax(1)[order] == labels[order]
    coverages = np.linspace(1.0 / steps, 1.0, steps)
    balanced, plain = [], []
    for coverage in coverages:
        kept = max(1, int(round(coverage * len(order))))
        y, hit = labels[order][:kept], correct[:kept]
        balanced.append(1.0 - float(np.mean([hit[y == k].mean() for k in np.unique(y)])))
        plain.append(1.0 - float(hit.mean()))
    return {
        "coverage": coverages.tolist(),
        "balanced_error": balanced,
        "error": plain,
        "aurc_balanced_error": float(np.trapezoid(balanced, coverages) / (coverages[-1] - coverages[0])),
        "aurc_error": float(np.trapezoid(plain, coverages) / (coverages[-1] - coverages[0])),
    }


__all__ = [
    "OOD_FEATURES",
    "collect_outputs",
    "dataset_items",
    "energy_score",
    "fit_mahalanobis",
    "fit_ood_gate",
    "fit_referral",
    "mahalanobis_score",
    "malignancy_scores",
    "ood_metrics",
    "referral_point",
    "referral_rates",
    "risk_coverage",
]
