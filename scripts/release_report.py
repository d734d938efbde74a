#!/usr/bin/env python
r"""Score a classifier checkpoint on its held-out test split through the analysis pipeline, for its model card.

    python scripts/release_report.py --model checkpoints/skin-dualnet-small \
        --data-root ../shared/data/ham10000 --splits-file runs/release/classifier/splits.json \
        --training-metrics runs/release/classifier/metrics.json --output runs/release/test_report.json

Every test image goes through `pipeline("skin-lesion-analysis")` (image file + its metadata, `explain=False`): the
served path, with the model's own lesion masks and its calibrated probabilities. The report holds, on the test split:
accuracy, balanced accuracy, macro AUC and ECE with lesion-clustered bootstrap 95 % intervals (all images of a lesion
resampled together); per-class sensitivity, specificity, AUC and support; melanoma sensitivity and specificity at the
default decision (argmax); ECE before (temperature 1) and after temperature scaling; the same scores per subgroup
(sex, age band, anatomical site; groups with fewer than `--min-group` images or fewer than two classes are marked too
small to judge); and the served masks' Dice / Jaccard / thresholded Jaccard against the HAM10000 reference masks.
`scripts/push_to_hub.py --metrics-file` puts it in the model card.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modeling_skinlesion.cli import HelpFormatter  # noqa: E402

logger = logging.getLogger(__name__)
SCORES = ("accuracy", "balanced_accuracy", "macro_auc", "ece")
RECIPE_STAGES = ("splits", "segmenter", "classifier", "calibrate", "eval-segmenter", "eval-segmenter-isic2017")
AGE_BANDS = ((0, 30, "<30"), (30, 45, "30-44"), (45, 60, "45-59"), (60, 75, "60-74"), (75, 200, ">=75"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="Classifier folder (or Hub id) to score.")
    parser.add_argument("--data-root", required=True, help="HAM10000 folder (images, masks, metadata CSV).")
    parser.add_argument("--splits-file", required=True, help="The training run's splits.json (its `test` ids).")
    parser.add_argument("--training-metrics", help="The training run's metrics.json (recipe, wall time, validation).")
    parser.add_argument(
        "--segmenter-metrics",
        action="append",
        default=[],
        help="NAME=FILE: a scripts/evaluate_model.py metrics.json of the nested segmenter, shown as NAME "
        "(repeatable).",
    )
    parser.add_argument(
        "--recipe-dir",
        help="Runs folder of scripts/train_release.sh: each stage's command and wall time go in the report.",
    )
    parser.add_argument(
        "--previous-report",
        help="An earlier report of the same weights (e.g. the shipped metrics.json) whose `recipe` and `training` "
        "entries are kept when --recipe-dir / --training-metrics are not given (re-exporting with new fits).",
    )
    parser.add_argument("--isic2017-root", help="ISIC 2017 folder: shifted but valid images for the OOD gate.")
    parser.add_argument("--ood-set", help="Folder of scripts/make_ood_set.py: images the OOD gate must refuse.")
    parser.add_argument("--trust-fit", help="trust.json of scripts/fit_trust.py (what the gate and referral saw).")
    parser.add_argument("--output", required=True, help="Where to write the report JSON (and risk_coverage.png).")
    parser.add_argument("--batch-size", type=int, default=16, help="Images per forward pass.")
    parser.add_argument("--bootstrap", type=int, default=2000, help="Lesion bootstrap resamples.")
    parser.add_argument("--min-group", type=int, default=50, help="Smallest subgroup that is scored.")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="Seed of the bootstrap resamples.")
    return parser.parse_args(argv)


def age_band(age: float | None) -> str:
    if age is None or not np.isfinite(age):
        return "unknown"
    return next(name for low, high, name in AGE_BANDS if low <= age < high)


def bootstrap(
    probabilities: np.ndarray, labels: np.ndarray, groups: list[str], score: Any, resamples: int, seed: int
) -> dict[str, list[float]]:
    """95 % percentile intervals of each entry of `score(p, y)` over lesion-clustered resamples."""
    rng = np.random.default_rng(seed)
    names = sorted(set(groups))
    members = {name: [] for name in names}
    for i, group in enumerate(groups):
        members[group].append(i)
    values: dict[str, list[float]] = {}
    for _ in range(resamples):
        picked = rng.integers(len(names), size=len(names))
        rows = np.concatenate([members[names[j]] for j in picked])
        for key, value in score(probabilities[rows], labels[rows]).items():
            if value is not None:
                values.setdefault(key, []).append(value)
    return {key: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for key, v in values.items()}


def _pipeline_scores(analyse: Any, files: list[Any], batch_size: int) -> list[dict[str, Any]]:
    """`ood_score` / `in_distribution` of images (paths or PIL images) through the pipeline, without metadata."""
    rows = []
    for start in range(0, len(files), batch_size):
        for result in analyse(files[start : start + batch_size], explain=False, batch_size=batch_size):
            rows.append({"ood_score": result["ood_score"], "in_distribution": result["in_distribution"]})
    return rows


def risk_coverage_figure(curve: dict[str, Any], path: Path, title: str) -> None:
    """The risk-coverage curve as a PNG (balanced error and error of the kept cases against coverage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4), dpi=110)
    axes.plot(
        curve["coverage"], curve["balanced_error"], label=f"balanced error (AURC {curve['aurc_balanced_error']:.3f})"
    )
    axes.plot(curve["coverage"], curve["error"], label=f"error (AURC {curve['aurc_error']:.3f})")
    axes.set_xlabel("coverage (share of test images kept, most confident first)")
    axes.set_ylabel("risk of the kept images")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, None)
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def trust_report(
    args: argparse.Namespace,
    analyse: Any,
    probabilities: np.ndarray,
    labels: np.ndarray,
    groups: list[str],
    rows: list[dict[str, Any]],
    names: list[str],
) -> dict[str, Any]:
    """The referral operating point, selective prediction and the OOD gate on the test split (and, when given, on
    ISIC 2017 and the OOD set), all through the pipeline's results."""
    import csv

    from modeling_skinlesion.trust import ood_metrics, referral_rates, risk_coverage

    config = analyse.model.config
    fit = json.loads(Path(args.trust_fit).read_text()) if args.trust_fit else {}
    report: dict[str, Any] = {}
    curve = risk_coverage(probabilities, labels)
    figure = Path(args.output).parent / "risk_coverage.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    risk_coverage_figure(curve, figure, f"Test split ({len(labels)} images), {Path(args.model).name}")
    report["selective_prediction"] = {**curve, "confidence": "maximum calibrated probability", "figure": figure.name}

    if config.referral_threshold is not None:
        malignant = [names.index(name) for name in config.malignant_labels]
        scores = np.array([row["malignancy_score"] for row in rows])
        is_malignant = np.isin(labels, malignant)
        threshold = float(config.referral_threshold)
        mel = names.index("mel") if "mel" in names else None

        def referral(p: np.ndarray, y: np.ndarray, s: np.ndarray | None = None) -> dict[str, float]:
            s = scores if s is None else s
            values = referral_rates(s, np.isin(y, malignant), threshold)
            if mel is not None and (y == mel).any():
                values["melanoma_sensitivity"] = float((s[y == mel] >= threshold).mean())
            return values

        test = referral(probabilities, labels)
        # Resample lesions with their malignancy scores: the score column travels with the probabilities.
        joined = np.concatenate([probabilities, scores[:, None]], 1)
        intervals = bootstrap(
            joined, labels, groups, lambda p, y: referral(p[:, :-1], y, p[:, -1]), args.bootstrap, args.bootstrap_seed
        )
        report["referral"] = {
            "malignant_labels": list(config.malignant_labels),
            "threshold": threshold,
            "target_sensitivity": config.referral_target_sensitivity,
            "validation": {
                "sensitivity": config.referral_sensitivity,
                "specificity": config.referral_specificity,
                "fitted_on": config.referral_fitted_on,
                **{k: v for k, v in (fit.get("referral") or {}).items() if k in ("images", "malignant_images")},
            },
            "test": {**test, "malignant_images": int(is_malignant.sum()), "images": len(labels)},
            "test_intervals_95": intervals,
        }

    if config.ood_feature is not None:
        test_scores = np.array([row["ood_score"] for row in rows], dtype=np.float64)
        gate: dict[str, Any] = {
            "method": "mahalanobis (class-conditional Gaussians, tied covariance; Lee et al. 2018)",
            "feature": config.ood_feature,
            "threshold": float(config.ood_threshold),
            "fitted_on": config.ood_fitted_on,
            "fit": fit.get("ood_gate"),
            "test": {"images": len(test_scores), "accepted": float(np.mean([row["in_distribution"] for row in rows]))},
        }
        if args.isic2017_root:
            from modeling_skinlesion.data import load_isic2017

            isic = load_isic2017(args.isic2017_root, masks=False)
            shifted = _pipeline_scores(analyse, [image.convert("RGB") for image in isic["image"]], args.batch_size)
            accepted = [row["in_distribution"] for row in shifted]
            gate["isic2017"] = {
                "images": len(shifted),
                "accepted_images": int(sum(accepted)),
                "accepted": float(np.mean(accepted)),
                "vs_test": ood_metrics(test_scores, [row["ood_score"] for row in shifted]),
            }
            logger.info("ISIC 2017: %d of %d accepted", sum(accepted), len(shifted))
        if args.ood_set:
            folder = Path(args.ood_set)
            with (folder / "manifest.csv").open() as handle:
                manifest = list(csv.DictReader(handle))
            out = _pipeline_scores(analyse, [str(folder / row["file"]) for row in manifest], args.batch_size)
            scores_out = np.array([row["ood_score"] for row in out])
            refused = np.array([not row["in_distribution"] for row in out])
            categories = sorted({row["category"] for row in manifest})
            part = np.array([row["part"] for row in manifest])
            category = np.array([row["category"] for row in manifest])
            gate["ood_set"] = {
                "images": len(out),
                "refused": float(refused.mean()),
                "refused_images": int(refused.sum()),
                "vs_test": ood_metrics(test_scores, scores_out),
                "report_part_vs_test": ood_metrics(test_scores, scores_out[part == "report"]),
                "by_category": {
                    name: {
                        "images": int((category == name).sum()),
                        "refused": float(refused[category == name].mean()),
                        "auroc_vs_test": ood_metrics(test_scores, scores_out[category == name])["auroc"],
                    }
                    for name in categories
                },
                "built_by": "scripts/make_ood_set.py",
            }
            logger.info("OOD set: %d of %d refused", refused.sum(), len(out))
        report["ood_gate"] = gate
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    import torch
    from transformers import pipeline

    from modeling_skinlesion.data import column_values, load_ham10000
    from modeling_skinlesion.training import evaluation as E

    start = time.time()
    test_ids = set(json.loads(Path(args.splits_file).read_text())["test"])
    dataset = load_ham10000(args.data_root, masks=True)
    rows = [i for i, image_id in enumerate(column_values(dataset, "image_id")) if image_id in test_ids]
    if len(rows) != len(test_ids):
        raise ValueError(f"{len(test_ids) - len(rows)} test ids of {args.splits_file} are not in {args.data_root}.")
    test = dataset.select(rows)
    analyse = pipeline("skin-lesion-analysis", model=args.model, trust_remote_code=True)
    config = analyse.model.config
    names = [config.id2label[i] for i in range(config.num_labels)]
    label_names = test.features["label"].names
    remap = np.array([names.index(name) for name in label_names])

    probabilities, labels, groups, ids, records, masks, trust_rows = [], [], [], [], [], [], []
    for start_row in range(0, len(test), args.batch_size):
        batch = test[start_row : start_row + args.batch_size]
        inputs = [
            {"image": image, "metadata": {"age": age, "sex": sex, "site": site}}
            for image, age, sex, site in zip(batch["image"], batch["age"], batch["sex"], batch["site"])
        ]
        results = analyse(inputs, explain=False, batch_size=args.batch_size)
        for result, label, group, image_id, age, sex, site, reference in zip(
            results,
            batch["label"],
            batch["group_id"],
            batch["image_id"],
            batch["age"],
            batch["sex"],
            batch["site"],
            batch["mask"],
        ):
            probabilities.append([result["probabilities"][name] for name in names])
            trust_rows.append({key: result[key] for key in ("ood_score", "in_distribution", "malignancy_score")})
            labels.append(int(remap[label]))
            groups.append(group)
            ids.append(image_id)
            records.append({"sex": sex or "unknown", "age_band": age_band(age), "site": site or "unknown"})
            masks.append((result["mask"], np.asarray(reference.convert("L")) > 127))
        logger.info(f"{len(ids)}/{len(test)} test images")
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)

    overall = E.classification_metrics(probabilities, labels, names)
    # The probabilities were divided by the stored temperature: multiplying log p by it gives the uncalibrated ones.
    temperature = float(config.temperature)
    uncalibrated = torch.from_numpy(np.log(np.clip(probabilities, 1e-12, 1)) * temperature).softmax(-1).numpy()
    before = E.classification_metrics(uncalibrated, labels, names)

    def score(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
        predicted = p.argmax(1)
        present = np.unique(y)
        mel = names.index("mel") if "mel" in names else None
        values = {
            "accuracy": float((predicted == y).mean()),
            "balanced_accuracy": float(np.mean([(predicted[y == k] == k).mean() for k in present])),
        }
        if mel is not None and (y == mel).any():
            values["melanoma_sensitivity"] = float((predicted[y == mel] == mel).mean())
        return values

    intervals = bootstrap(probabilities, labels, groups, score, args.bootstrap, args.bootstrap_seed)
    auc_intervals = bootstrap(
        probabilities,
        labels,
        groups,
        lambda p, y: {"macro_auc": E.classification_metrics(p, y, names)["macro_auc"]} if len(set(y)) > 1 else {},
        max(args.bootstrap // 10, 100),
        args.bootstrap_seed,
    )
    intervals.update(auc_intervals)

    subgroups: dict[str, dict[str, Any]] = {}
    for field in ("sex", "age_band", "site"):
        values = sorted({record[field] for record in records})
        subgroups[field] = {}
        for value in values:
            member = np.array([record[field] == value for record in records])
            y = labels[member]
            entry: dict[str, Any] = {"images": int(member.sum()), "classes": int(len(set(y.tolist())))}
            if member.sum() < args.min_group or len(set(y.tolist())) < 2:
                entry["too_small"] = True
            else:
                scores = E.classification_metrics(probabilities[member], y, names)
                entry.update({key: scores[key] for key in ("accuracy", "balanced_accuracy", "macro_auc")})
                mel = names.index("mel")
                if (y == mel).sum() >= 10:
                    entry["melanoma_sensitivity"] = scores["per_class_sensitivity"]["mel"]
                    entry["melanoma_images"] = int((y == mel).sum())
            subgroups[field][value] = entry

    segmentation = E.segmentation_metrics([m for m, _ in masks], [r for _, r in masks])
    training = json.loads(Path(args.training_metrics).read_text()) if args.training_metrics else {}
    segmenter = {}
    for pair in args.segmenter_metrics:
        name, sep, path = pair.partition("=")
        if not sep:
            raise ValueError(f"--segmenter-metrics takes NAME=FILE, got {pair!r}.")
        evaluated = json.loads(Path(path).read_text())
        counted = evaluated.get("num_images", evaluated.get("num_samples"))
        segmenter[name] = {**evaluated["metrics"], "num_samples": counted}
    recipe = []
    if args.recipe_dir:
        for stage in RECIPE_STAGES:
            folder = Path(args.recipe_dir) / stage
            if (folder / "command.txt").is_file() and (folder / "wall_seconds.txt").is_file():
                recipe.append(
                    {
                        "stage": stage,
                        "command": (folder / "command.txt").read_text().strip(),
                        "wall_time_s": int((folder / "wall_seconds.txt").read_text().strip()),
                    }
                )
    trust = trust_report(args, analyse, probabilities, labels, groups, trust_rows, names)
    previous = json.loads(Path(args.previous_report).read_text()) if args.previous_report else {}
    support = {name: int((labels == k).sum()) for k, name in enumerate(names)}
    report = {
        "task": "classification",
        "split": "test",
        "path": "pipeline('skin-lesion-analysis'), explain=False: image file + metadata, the model's own masks",
        "model": str(args.model),
        "datasets": ["HAM10000"],
        "test_images": len(ids),
        "test_lesions": len(set(groups)),
        **{key: overall[key] for key in SCORES},
        "intervals_95": intervals,
        "per_class": {
            name: {
                "support": support[name],
                "sensitivity": overall["per_class_sensitivity"][name],
                "specificity": overall["per_class_specificity"][name],
                "auc": overall["per_class_auc"][name],
            }
            for name in names
        },
        "melanoma_sensitivity": overall["per_class_sensitivity"]["mel"],
        "melanoma_specificity": overall["per_class_specificity"]["mel"],
        "predicted_classes": sorted({names[k] for k in probabilities.argmax(1)}),
        "calibration": {
            "temperature": temperature,
            "fitted_on": "validation split",
            "test_ece_before": before["ece"],
            "test_ece_after": overall["ece"],
            "validation": training.get("calibration"),
        },
        "subgroups": subgroups,
        "served_masks_vs_reference": {
            key: segmentation[key] for key in ("dice", "jaccard", "thresholded_jaccard") if key in segmentation
        },
        "segmenter": segmenter,
        **trust,
        "recipe": recipe or previous.get("recipe", []),
        "training": {
            "wall_time_s": training.get("wall_time_s"),
            "split": training.get("split"),
            "best_epoch": (training.get("best") or {}).get("epoch"),
            "args": training.get("args"),
        }
        if training
        else previous.get("training", {}),
        "report_wall_time_s": round(time.time() - start, 1),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    logger.info(
        "test: balanced accuracy %.4f, macro AUC %.4f, ECE %.4f (before temperature %.4f), melanoma sensitivity %.3f;"
        " wrote %s",
        report["balanced_accuracy"],
        report["macro_auc"],
        report["ece"],
        before["ece"],
        report["melanoma_sensitivity"],
        args.output,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
