"""What `finetune.py` does beyond the training run every script shares: load the clinic's cases (`load_cases`), map
its classes onto the checkpoint's (`resolve_label_map`, `collapse_probabilities` for the "before" scores), map its
metadata spellings onto the model's vocabularies (`extend_synonyms`, `metadata_report`), and build the model to
fine-tune (`build_model`: a new head warm-started from the mapped classes when the classes differ)."""

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from huggingface_hub import ModelCard

from modeling_skinlesion import SkinDualNet, SkinLesionMetadataProcessor
from modeling_skinlesion.configuration_skinlesion import MALIGNANT_LABELS
from modeling_skinlesion.data import column_values, load_clinic
from modeling_skinlesion.model_card import load_metrics, training_datasets

logger = logging.getLogger(__name__)


def load_cases(args: Any) -> datasets.Dataset:
    """The clinic's labelled images: `load_clinic` on `args.images` and `args.csv` with the script's column map,
    class order (`--labels`), masks folder and source name; rows without a label are dropped."""
    from _training import keep_labelled

    dataset = load_clinic(
        args.images,
        args.csv,
        pairs_to_dict(args.column_map),
        label_names=args.labels or None,
        masks_dir=args.masks_dir,
        source=args.source_name,
    )
    return keep_labelled(dataset)


def pairs_to_dict(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


# --------------------------------------------------------------------------------------------------------------------
# Labels and metadata
# --------------------------------------------------------------------------------------------------------------------
def resolve_label_map(clinic: list[str], checkpoint: list[str], pairs: list[str]) -> dict[str, list[str]]:
    """Clinic class → the checkpoint classes it stands for (same-named classes map to each other by default)."""
    mapping = {name: [name] for name in clinic if name in checkpoint}
    for key, value in pairs_to_dict(pairs).items():
        if key not in clinic:
            raise ValueError(f"--label-map names the clinic class {key!r}, but the clinic's classes are {clinic}.")
        targets = [t.strip() for t in value.split(",") if t.strip()]
        unknown = [t for t in targets if t not in checkpoint]
        if unknown or not targets:
            raise ValueError(
                f"--label-map {key}={value}: {unknown or value!r} are not classes of the checkpoint; its classes are "
                f"{checkpoint}."
            )
        mapping[key] = targets
    used = Counter(t for targets in mapping.values() for t in targets)
    twice = sorted(t for t, n in used.items() if n > 1)
    if twice:
        raise ValueError(f"--label-map assigns the checkpoint classes {twice} to several clinic classes.")
    return mapping


def collapse_probabilities(
    probabilities: np.ndarray, checkpoint: list[str], clinic: list[str], mapping: dict[str, list[str]]
) -> np.ndarray:
    """Checkpoint probabilities → clinic-class probabilities: each clinic class sums its mapped checkpoint classes;
    rows are renormalised over the mapped mass (a row with none becomes uniform)."""
    collapsed = np.zeros((probabilities.shape[0], len(clinic)))
    for j, name in enumerate(clinic):
        for target in mapping.get(name, []):
            collapsed[:, j] += probabilities[:, checkpoint.index(target)]
    totals = collapsed.sum(axis=1, keepdims=True)
    return np.where(totals > 0, collapsed / np.where(totals > 0, totals, 1), 1.0 / len(clinic))


def extend_synonyms(config, site_pairs: list[str], sex_pairs: list[str]) -> dict[str, dict[str, str]]:
    """Add the clinic's site/sex spellings to the config's synonyms (checked against its vocabularies)."""
    added = {}
    for field, pairs, vocab in (("site", site_pairs, config.site_vocab), ("sex", sex_pairs, config.sex_vocab)):
        new = {key.strip(): value.strip() for key, value in pairs_to_dict(pairs).items()}
        unknown = {key: value for key, value in new.items() if value not in vocab}
        if unknown:
            raise ValueError(f"--{field}-map targets {unknown} are not in the model's {field} vocabulary {vocab}.")
        synonyms = dict(getattr(config, f"{field}_synonyms"))
        synonyms.update({key: value for key, value in new.items()})
        setattr(config, f"{field}_synonyms", synonyms)
        added[field] = new
    return added


def metadata_report(dataset, metadata: SkinLesionMetadataProcessor) -> dict[str, Any]:
    """How the clinic's age/sex/site values map onto the model's vocabularies: recognised, missing, and unknown values
    (treated as missing) with their counts."""
    columns = {name: column_values(dataset, name) for name in ("age", "sex", "site")}
    report: dict[str, Any] = {}
    for field in ("sex", "site"):
        recognised, missing, unknown = Counter(), 0, Counter()
        for raw in columns[field]:
            if raw is None:
                missing += 1
                continue
            parsed = metadata.normalize_record({field: raw})[field]
            if parsed is None:
                unknown[raw] += 1
            else:
                recognised[parsed] += 1
        report[field] = {"recognised": dict(recognised), "missing": missing, "unknown_as_missing": dict(unknown)}
    ages = [metadata.parse_age(value) for value in columns["age"]]
    report["age"] = {
        "recognised": int(sum(a is not None for a in ages)),
        "missing": int(sum(value is None or bool(np.isnan(value)) for value in columns["age"])),
    }
    return report


def base_training_sets(checkpoint: str) -> list[str]:
    """The training sets of the checkpoint, from its model card or its training run's metrics.json, if recorded."""
    folder = Path(checkpoint)
    try:
        card = ModelCard.load(folder / "README.md" if folder.is_dir() else checkpoint)
        if card.data.datasets:
            return list(card.data.datasets)
    except Exception as error:  # no card, not a card, or offline: huggingface_hub raises several kinds
        logger.info(f"No model card for {checkpoint} ({type(error).__name__}); looking for its metrics.json.")
    if (folder / "metrics.json").is_file():
        return training_datasets(load_metrics(folder / "metrics.json"))
    return []


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------
def build_model(
    checkpoint: str, base: SkinDualNet, clinic: list[str], mapping: dict[str, list[str]], weights: list[float] | None
) -> SkinDualNet:
    """The model to fine-tune: the checkpoint itself when the classes match, else the checkpoint with a new head for
    the clinic's classes, warm-started from the old head's row of each one-to-one mapped class."""
    checkpoint_labels = [base.config.id2label[i] for i in range(base.config.num_labels)]
    # The checkpoint's calibration (bias, temperature) and loss offsets belong to its own data: start uncalibrated
    # (scripts/calibrate.py fits them again on the clinic's held-out cases).
    uncalibrated = {"logit_bias": None, "logit_adjustment": None, "temperature": 1.0}
    if clinic == checkpoint_labels:
        base.config.class_weights = weights
        for key, value in uncalibrated.items():
            setattr(base.config, key, value)
        # The out-of-distribution gate and the referral point were fitted on the checkpoint's data: kept, and marked
        # as inherited (scripts/fit_trust.py refits them on the clinic's split), so the card and the Space say so.
        if base.config.ood_feature is not None:
            base.config.ood_fitted_on = f"inherited from {checkpoint}, not refitted: {base.config.ood_fitted_on}"
        if base.config.referral_threshold is not None:
            base.config.referral_fitted_on = (
                f"inherited from {checkpoint}, not refitted (before fine-tuning and recalibration): "
                f"{base.config.referral_fitted_on}"
            )
        return base
    # A new head: the gate's class means and the referral's malignant classes belong to the old classes; dropped.
    uncalibrated.update(ood_feature=None, ood_threshold=None, ood_fitted_on=None, referral_threshold=None)
    uncalibrated.update(
        malignant_labels=[name for name in clinic if name in MALIGNANT_LABELS], referral_fitted_on=None
    )
    model = SkinDualNet.from_pretrained(
        checkpoint,
        id2label=dict(enumerate(clinic)),
        label2id={name: i for i, name in enumerate(clinic)},
        class_weights=weights,
        ignore_mismatched_sizes=True,
        **uncalibrated,
    )
    old_head, new_head = base.classifier[-1], model.classifier[-1]
    with torch.no_grad():
        for j, name in enumerate(clinic):
            if len(mapping.get(name, [])) == 1:
                source = checkpoint_labels.index(mapping[name][0])
                new_head.weight[j] = old_head.weight[source]
                new_head.bias[j] = old_head.bias[source]
    return model
