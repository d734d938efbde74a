#!/usr/bin/env python
r"""Score the classifier ablation on its held-out test split: metrics, bootstrap intervals, Grad-CAM lesion focus.

    python scripts/ablation_report.py --data-root ../shared/data/ham10000 --output-dir runs/ablation-report \
        --model a=runs/skin-dualnet-small-single b=runs/skin-dualnet-small-nometa c=runs/skin-dualnet-small \
        --no-metadata-variant d=c --focus-samples 128

Every `--model NAME=FOLDER` is a classifier saved by `scripts/train_classifier.py` with `--test-size > 0`; all must
have been trained on the same split (their `splits.json` test ids must agree). `--no-metadata-variant NEW=NAME`
scores model NAME again with every metadata field withheld (age missing, sex and site "unknown"). Lesion images come
from each classifier's own segmenter (as at inference). For each variant the script writes the per-image
probabilities (`predictions_<name>.csv`) and, in `results.json`/`results.md`: accuracy, balanced accuracy, macro
AUC, ECE (the shipped `lesion_classification` metric), the mean per-branch Grad-CAM lesion focus on the first
`--focus-samples` test images (share of heatmap mass inside the ground-truth HAM10000 mask; the lesion branch's
heatmap is put back into its crop box; a uniform heatmap would score the lesion's share of the image), a
prior-adjusted balanced accuracy (argmax of the probabilities divided by the training run's class frequencies), and
lesion-clustered bootstrap 95 % intervals of the differences in balanced accuracy and macro AUC between variants.
It also picks the variant to export (best validation balanced accuracy in its training run) and writes
`card_metrics.json` for `scripts/push_to_hub.py --metrics-file`.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from modeling_skinlesion.training.arguments import DataArguments, EvaluationArguments, parse_arguments, with_default  # noqa: E402

SCORES = ("accuracy", "balanced_accuracy", "macro_auc", "ece")
COMPARISONS = (("b", "a", "dual vs single"), ("c", "b", "metadata vs none"), ("c", "d", "metadata at test")) + (
    ("c", "a", "full vs single"),
)


@dataclass(kw_only=True)
class AblationArguments(EvaluationArguments, DataArguments):
    _argument_group_name = "ablation"

    model: list[str] = field(metadata={"help": "NAME=FOLDER of each trained classifier."})
    no_metadata_variant: list[str] = field(
        default_factory=list, metadata={"help": "NEW=NAME: model NAME scored again with its metadata withheld."}
    )
    output_dir: str = field(metadata={"help": "Folder for results.json, results.md, card_metrics.json and CSVs."})
    focus_samples: int = field(default=128, metadata={"help": "Test images scored for lesion focus."})
    bootstrap: int = field(default=2000, metadata={"help": "Lesion-clustered bootstrap resamples."})
    bootstrap_seed: int = field(default=0, metadata={"help": "Seed of the bootstrap resamples."})

    # The ablation scores the HAM10000 classifiers: --dataset defaults to it (give --data-root only).
    dataset: list[str] = with_default(DataArguments, "dataset", ["ham10000"])

    def check(self) -> None:
        pairs = {"--model": self.model, "--no-metadata-variant": self.no_metadata_variant}
        for option, values in pairs.items():
            for value in values:
                name, sep, target = value.partition("=")
                if not sep or not name or not target:
                    raise ValueError(f"{option} takes NAME=VALUE pairs, got {value!r}")
        names = [value.partition("=")[0] for value in self.model]
        for value in self.no_metadata_variant:
            new, _, base = value.partition("=")
            if base not in names:
                raise ValueError(f"--no-metadata-variant {new}={base}: {base!r} is not a --model name ({names})")


def balanced_accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    predicted = probabilities.argmax(1)
    return float(np.mean([(predicted[labels == k] == k).mean() for k in np.unique(labels)]))


def macro_auc(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """One-vs-rest AUC (Mann-Whitney ranks) averaged over the classes present with positives and negatives."""
    aucs = []
    for k in np.unique(labels):
        positive = labels == k
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = np.empty(len(labels))
        ranks[np.argsort(probabilities[:, k], kind="stable")] = np.arange(1, len(labels) + 1)
        aucs.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs))


BOOTSTRAPPED = {
    "balanced_accuracy": (balanced_accuracy, "raw"),
    "balanced_accuracy_prior_adjusted": (balanced_accuracy, "adjusted"),
    "macro_auc": (macro_auc, "raw"),
}


def bootstrap_differences(
    probabilities: dict[str, dict[str, np.ndarray]], labels: np.ndarray, groups: np.ndarray, resamples: int, seed: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Differences in balanced accuracy (raw and prior-adjusted) and macro AUC between variants, with 95 % intervals
    from resampling whole lesions (all their images together), paired across variants. `probabilities` maps "raw" and
    "adjusted" to `{variant: (n, num_labels) array}`."""
    rng = np.random.default_rng(seed)
    unique, group_index = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(group_index == g) for g in range(len(unique))]
    variants = list(probabilities["raw"])
    draws = {(metric, key): [] for metric in BOOTSTRAPPED for key in variants}
    for _ in range(resamples):
        chosen = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        for metric, (function, kind) in BOOTSTRAPPED.items():
            for key in variants:
                draws[metric, key].append(function(probabilities[kind][key][chosen], labels[chosen]))
    result: dict[str, dict[str, dict[str, float]]] = {}
    for metric, (function, kind) in BOOTSTRAPPED.items():
        result[metric] = {}
        chosen_set = probabilities[kind]
        for first, second, meaning in COMPARISONS:
            if first in chosen_set and second in chosen_set:
                difference = np.array(draws[metric, first]) - np.array(draws[metric, second])
                observed = function(chosen_set[first], labels) - function(chosen_set[second], labels)
                low, high = np.percentile(difference, [2.5, 97.5])
                result[metric][f"{first}-{second}"] = {
                    "meaning": meaning,
                    "difference": observed,
                    "ci95_low": float(low),
                    "ci95_high": float(high),
                    "share_of_resamples_above_zero": float((difference > 0).mean()),
                }
    return result


def markdown_table(rows: dict[str, dict[str, Any]], descriptions: dict[str, str]) -> str:
    lines = [
        "| variant | accuracy | balanced acc. | macro AUC | ECE | balanced acc. (prior-adjusted) "
        "| lesion focus: image branch | lesion branch | uniform heatmap (lesion share of image) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        focus = row["lesion_focus"]
        values = [row["metrics"][key] for key in (*SCORES, "balanced_accuracy_prior_adjusted")]
        values += [focus.get(branch) for branch in ("image", "lesion", "chance")]
        cells = ["–" if value is None else f"{value:.3f}" for value in values]  # None: undefined on this split
        lines.append(f"| ({name}) {descriptions[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_arguments(AblationArguments, argv, description=__doc__)

    # The heavy imports come after parsing, so that --help and usage errors answer at once.
    import json
    import logging
    import time

    import pandas as pd
    import torch
    from datasets import Image

    from modeling_skinlesion import SkinLesionMetadataProcessor
    from modeling_skinlesion.data import SkinLesionTransform, build_dataloader, column_values
    from modeling_skinlesion.training import evaluation as E
    from modeling_skinlesion.training import loop as T

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(message)s", level=logging.INFO)
    logger = logging.getLogger("ablation_report")
    device = E.evaluation_device(args.device)
    models = dict(value.split("=", 1) for value in args.model)
    ablations = dict(value.split("=", 1) for value in args.no_metadata_variant)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.bootstrap_seed)

    # The one test split all variants share ---------------------------------------------------------------------------
    test_ids = {
        name: json.loads((Path(folder) / "splits.json").read_text())["test"] for name, folder in models.items()
    }
    reference_name = next(iter(models))
    for name, ids in test_ids.items():
        if sorted(ids) != sorted(test_ids[reference_name]):
            raise ValueError(f"The test split of {models[name]} differs from that of {models[reference_name]}.")
    if not test_ids[reference_name]:
        raise ValueError(f"{models[reference_name]}/splits.json has no test images; train with --test-size > 0.")
    dataset = T.load_sources(args, "classification", label_set="ham10000")
    split = E.select_ids(dataset, test_ids[reference_name], f"{models[reference_name]}/splits.json")
    masks = split.select(range(min(args.focus_samples, len(split)))).cast_column("mask", Image(decode=False))["mask"]
    if any(mask is None for mask in masks):
        raise ValueError("Lesion focus is scored against ground-truth masks: every focus image needs one.")
    group_of = dict(zip(column_values(split, "image_id"), column_values(split, "group_id")))
    logger.info(f"Test split: {len(split)} images of {len(set(group_of.values()))} lesions")

    # Predict every variant -------------------------------------------------------------------------------------------
    rows: dict[str, dict[str, Any]] = {}
    descriptions: dict[str, str] = {}
    runs = [(name, folder, False) for name, folder in models.items()]
    runs += [(new, models[base], True) for new, base in ablations.items()]
    labels = groups = None
    test_probabilities: dict[str, dict[str, np.ndarray]] = {"raw": {}, "adjusted": {}}
    for name, folder, drop_metadata in runs:
        start = time.perf_counter()
        model, processor = E.load_model(folder, device)
        names = E.model_labels(model)
        transform = SkinLesionTransform(
            processor, train=False, metadata_processor=SkinLesionMetadataProcessor.from_config(model.config)
        )
        dataloader = build_dataloader(split, transform, args.batch_size)
        predicted = E.predict_classifier(
            model, dataloader, device, focus_limit=args.focus_samples, drop_metadata=drop_metadata
        )
        variant_labels = E.label_remap(split, names)[predicted["labels"]]
        if labels is None:
            labels = variant_labels
            groups = np.array([group_of[image_id] for image_id in predicted["image_ids"]])
        elif not np.array_equal(labels, variant_labels):
            raise ValueError(f"Variant {name} saw the test images in another order.")
        metrics = E.classification_metrics(predicted["probabilities"], variant_labels, names)
        # Prior-adjusted decision (logit adjustment): divide by the training run's class frequencies, so that a model
        # whose argmax collapses onto the majority class still shows what its scores separate.
        counts = json.loads((Path(folder) / "metrics.json").read_text())["split"]["train"]["class_counts"]
        prior = np.array([counts.get(label, 0) for label in names], dtype=float) + 1.0
        adjusted = predicted["probabilities"] / (prior / prior.sum())
        adjusted /= adjusted.sum(1, keepdims=True)
        test_probabilities["raw"][name] = predicted["probabilities"]
        test_probabilities["adjusted"][name] = adjusted
        metrics["balanced_accuracy_prior_adjusted"] = balanced_accuracy(adjusted, variant_labels)
        config = model.config
        descriptions[name] = (
            ("dual encoder" if config.use_lesion_branch else "single encoder")
            + (" + metadata" if config.use_metadata else "")
            + (", metadata withheld at test" if drop_metadata else "")
        )
        rows[name] = {
            "model": folder,
            "metadata_withheld": drop_metadata,
            "metrics": {
                key: metrics[key]
                for key in (*SCORES, "balanced_accuracy_prior_adjusted", "per_class_sensitivity", "num_samples")
            },
            "lesion_focus": {b: float(np.nanmean(v)) for b, v in predicted["lesion_focus"].items()},
            "lesion_focus_images": {b: len(v) for b, v in predicted["lesion_focus"].items()},
            "wall_time_s": time.perf_counter() - start,
        }
        table = pd.DataFrame(predicted["probabilities"], columns=names)
        table.insert(0, "label", [names[i] for i in variant_labels])
        table.insert(0, "lesion_id", groups)
        table.insert(0, "image_id", predicted["image_ids"])
        table.to_csv(output_dir / f"predictions_{name}.csv", index=False)
        logger.info(f"({name}) {descriptions[name]}: " + T.format_metrics(metrics, SCORES) + f" | {rows[name]}")
        del model

    differences = bootstrap_differences(test_probabilities, labels, groups, args.bootstrap, args.bootstrap_seed)

    # The model to export: the best validation balanced accuracy of its own training run (never the test score) ----
    validation = {
        name: json.loads((Path(folder) / "metrics.json").read_text())["best"]["value"]
        for name, folder in models.items()
    }
    export = max(validation, key=validation.get)
    card = {
        "dataset": "ham10000",
        "split": "test (lesion-grouped, held out, never used for model selection)",
        "num_samples": int(len(labels)),
        "model": models[export],
        "metrics": {
            **{key: rows[export]["metrics"][key] for key in (*SCORES, "balanced_accuracy_prior_adjusted")},
            "per_class_sensitivity": rows[export]["metrics"]["per_class_sensitivity"],
            "lesion_focus": rows[export]["lesion_focus"],
            "ablation_balanced_accuracy": {
                descriptions[n]: row["metrics"]["balanced_accuracy"] for n, row in rows.items()
            },
        },
    }
    T.write_json(output_dir / "card_metrics.json", card)
    result = {
        "test_images": int(len(labels)),
        "test_lesions": int(len(set(groups))),
        "focus_samples": args.focus_samples,
        "focus_masks": "ground-truth HAM10000 masks",
        "variants": rows,
        "descriptions": descriptions,
        "differences": differences,
        "validation_balanced_accuracy": validation,
        "export": {"variant": export, "model": models[export], "card_metrics": str(output_dir / "card_metrics.json")},
    }
    T.write_json(output_dir / "results.json", result)
    lines = [
        markdown_table(rows, descriptions),
        "",
        "| difference | balanced acc. [95 % CI] | prior-adjusted balanced acc. [95 % CI] | macro AUC [95 % CI] |",
        "| --- | --- | --- | --- |",
    ]
    for key, value in differences["balanced_accuracy"].items():
        cells = [
            f"{d[key]['difference']:+.3f} [{d[key]['ci95_low']:+.3f}, {d[key]['ci95_high']:+.3f}]"
            for d in (
                differences["balanced_accuracy"],
                differences["balanced_accuracy_prior_adjusted"],
                differences["macro_auc"],
            )
        ]
        lines.append(f"| {key} ({value['meaning']}) | " + " | ".join(cells) + " |")
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")
    logger.info("\n" + "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
