"""Calibration of a `SkinDualNet` for the data it will see: post-hoc logit bias and temperature, the referral
threshold and the out-of-distribution gate, refitted together on one population's split (`recalibrate`).

Fine-tuning calls it on the clinic's split after training (`finetuning.finetune`, `recalibrate=True`), and
scripts/calibrate.py on any folder + CSV or official layout (`--refit-trust`). What is fitted where:

| what                     | fitted on                                             | stored in                        |
| ------------------------ | ----------------------------------------------------- | -------------------------------- |
| logit bias, temperature  | validation logits (`evaluation.fit_calibration`)      | `config.logit_bias`, `temperature|
| referral threshold       | validation, calibrated (`trust.fit_referral`)         | `config.referral_*`              |
| gate means and whitening | train split's fused embeddings (`trust.fit_ood_gate`) | `ood_gate.*` buffers             |
| gate threshold           | validation scores at `ood_accept_rate`                | `config.ood_threshold`           |

Every image goes through the model's ordinary forward (the segmenter's own masks, as at inference). The referral
point needs malignant and benign validation cases (else it is dropped, and the report says why); the gate needs at
least two training images per class present.
"""

import logging
from typing import Any

import numpy as np
import torch

from modeling_skinlesion.configuration_skinlesion import MALIGNANT_LABELS
from modeling_skinlesion.data import build_dataloader, class_counts

from .evaluation import classification_metrics, fit_calibration

logger = logging.getLogger(__name__)


@torch.no_grad()
def raw_outputs(model: Any, dataset: Any, transform: Any, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Logits without the post-hoc bias and temperature, the gate's fused embeddings and the labels of `dataset`
    through the model's forward (its own lesion masks). One process; unreadable rows are skipped (reported by name
    by the file check before)."""
    config = model.config
    saved = config.logit_bias, config.temperature
    config.logit_bias, config.temperature = None, 1.0
    logits, fused, labels = [], [], []
    was_training = model.training
    model.eval()
    try:
        for batch in build_dataloader(dataset, transform, batch_size):
            if len(batch["image_id"]) == 0:
                continue
            output = model(
                pixel_values=batch["pixel_values"].to(device),
                age=batch["age"].to(device),
                sex_ids=batch["sex_ids"].to(device),
                site_ids=batch["site_ids"].to(device),
            )
            logits.append(output.logits.float().cpu())
            parts = [output.image_embeds] + ([output.lesion_embeds] if output.lesion_embeds is not None else [])
            fused.append(torch.cat(parts, -1).float().cpu())
            labels.append(batch["labels"].cpu())
    finally:
        config.logit_bias, config.temperature = saved
        model.train(was_training)
    if not logits:
        raise ValueError("No readable images to calibrate on.")
    return {"logits": torch.cat(logits).numpy(), "fused": torch.cat(fused), "labels": torch.cat(labels).numpy()}


def calibrated_probabilities(config: Any, logits: np.ndarray) -> np.ndarray:
    """The config's bias and temperature applied to raw logits, softmaxed."""
    logits = np.asarray(logits, dtype=np.float64)
    if config.logit_bias is not None:
        logits = logits + np.asarray(config.logit_bias)
    return torch.from_numpy(logits / float(config.temperature)).softmax(-1).numpy()


def recalibrate(
    model: Any,
    splits: Any,
    transform: Any,
    accelerator: Any,
    batch_size: int,
    population: str,
    base: str = "",
    tune_logit_bias: bool = True,
    referral_sensitivity: float = 0.90,
    ood_accept_rate: float = 0.99,
    refit_trust: bool = True,
) -> dict[str, Any]:
    """Refit, in place, the calibration of `model` (a `SkinDualNet`) on `splits["validation"]` and, with
    `refit_trust`, its referral threshold (validation) and out-of-distribution gate (statistics on `splits["train"]`,
    threshold on validation). `transform` is the evaluation `SkinLesionTransform`; `population` names the data in
    the config's `*_fitted_on` and the card. Returns the report (with a one-line `summary` for the model card)."""
    from modeling_skinlesion.trust import fit_ood_gate, fit_referral

    config = model.config
    names = [config.id2label[i] for i in range(config.num_labels)]
    device = accelerator.device
    validation = raw_outputs(model, splits["validation"], transform, batch_size, device)
    n_val = len(validation["labels"])
    report: dict[str, Any] = {"population": population, "validation_images": n_val}

    # Logit bias and temperature --------------------------------------------------------------------------------------
    train_counts = class_counts(splits["train"])
    report["temperature_and_bias"] = fit_calibration(
        config, validation["logits"], validation["labels"], train_counts, tune_logit_bias, True
    )
    probabilities = calibrated_probabilities(config, validation["logits"])
    report["validation"] = classification_metrics(probabilities, validation["labels"], names)
    parts = [
        f"temperature {config.temperature:.3f}"
        + (f" and logit bias (tau {report['temperature_and_bias']['logit_bias_tau']})" if tune_logit_bias else "")
        + f" on {n_val} validation images of {population}"
    ]
    if not refit_trust:
        report["summary"] = "; ".join(parts)
        return report

    # Referral point --------------------------------------------------------------------------------------------------
    malignant = [name for name in (config.malignant_labels or MALIGNANT_LABELS) if name in names]
    is_malignant = np.isin(validation["labels"], [names.index(name) for name in malignant])
    if malignant and is_malignant.any() and (~is_malignant).any():
        fitted_on = f"{population} validation split ({n_val} images, {int(is_malignant.sum())} malignant)"
        report["referral"] = fit_referral(
            model, probabilities, validation["labels"], referral_sensitivity, malignant, fitted_on=fitted_on
        )
        parts.append(
            f"referral threshold {config.referral_threshold:.4f} (sensitivity {config.referral_sensitivity:.3f}, "
            f"specificity {config.referral_specificity:.3f} on {n_val} validation images, "
            f"{int(is_malignant.sum())} malignant)"
        )
    else:
        why = "no malignant class" if not malignant else "the validation split lacks malignant or benign cases"
        config.referral_threshold = None
        config.referral_fitted_on = None
        report["referral"] = {"refitted": False, "reason": why}
        parts.append(f"no referral point ({why})")

    # Out-of-distribution gate ----------------------------------------------------------------------------------------
    train = raw_outputs(model, splits["train"], transform, batch_size, device)
    counts = np.bincount(train["labels"], minlength=config.num_labels)
    present = counts[counts > 0]
    if len(train["labels"]) >= 2 * len(present) and present.min() >= 2:
        fitted_on = (
            f"{population}: statistics on its train split ({len(train['labels'])} images), threshold at "
            f"{ood_accept_rate:.0%} of its validation split ({n_val} images)"
        )
        report["ood_gate"] = fit_ood_gate(
            model,
            train["fused"],
            torch.from_numpy(train["labels"]),
            validation["fused"],
            accept_rate=ood_accept_rate,
            fitted_on=fitted_on,
        )
        parts.append(
            f"out-of-distribution gate statistics on {len(train['labels'])} train images, threshold "
            f"{config.ood_threshold:.1f} at {ood_accept_rate:.0%} of {n_val} validation images"
        )
    else:
        report["ood_gate"] = {"refitted": False, "reason": f"too few training images per class ({counts.tolist()})"}
        parts.append("out-of-distribution gate not refitted (too few training images per class)")
    report["summary"] = "; ".join(parts)
    logger.info(f"Recalibrated for {population}: {report['summary']}")
    return report


__all__ = ["calibrated_probabilities", "raw_outputs", "recalibrate"]
