#!/usr/bin/env python
r"""A learning curve of fine-tuning on an external clinic: ISIC 2017 (other centres and cameras than HAM10000) as the
stand-in clinic, zero-shot and then fine-tuned on a growing number of its images.

    python scripts/clinic_learning_curve.py --checkpoint checkpoints/skin-dualnet-small \
        --isic2017-root ../shared/data/isic2017 --output-dir runs/learning-curve \
        --sizes 25 50 100 200 --unfrozen-size 200

1. The shared ISIC 2017 copy (557 images: naevus, melanoma) becomes a clinic folder + CSV (`clinic.csv`: file,
   diagnosis nv / mel, age, sex, site). A fixed held-out part (`--holdout`, stratified by class, seed
   `--split-seed`; ISIC 2017 has no lesion ids, so the image is the group) is never used by any run.
2. Zero-shot: the checkpoint as it is, its 7 classes collapsed onto mel / nv (`collapse_probabilities`).
3. For each size N of `--sizes`: the first N images of one stratified shuffle of the rest (nested: 25 within 50 ...)
   go to `modeling_skinlesion.training.finetune` with frozen encoders (its own 80/20 grouped split picks the epoch
   and the calibration), and once at `--unfrozen-size` with the encoders trained (no feature cache).
4. Every model, zero-shot included, is scored on the held-out images through `pipeline("skin-lesion-analysis")`
   (image file + metadata, `explain=False`): balanced accuracy (arg-max), melanoma AUC, melanoma sensitivity and
   specificity, with 95 % bootstrap intervals over the images; the wall time of each fine-tuning run.

Each run is saved in `--output-dir/runs/N-frozen` (or `-unfrozen`) and skipped when its metrics.json exists, so an
interrupted curve resumes. Writes `learning-curve.json` and `learning-curve.png` in `--output-dir`.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modeling_skinlesion.cli import HelpFormatter  # noqa: E402

logger = logging.getLogger("clinic_learning_curve")
CLASSES = ["mel", "nv"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--checkpoint", default="checkpoints/skin-dualnet-small", help="The SkinDualNet to start from."
    )
    parser.add_argument("--isic2017-root", required=True, type=Path, help="The shared ISIC 2017 copy.")
    parser.add_argument("--output-dir", required=True, type=Path, help="Where the runs and the curve go.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200], help="Clinic images per run.")
    parser.add_argument(
        "--unfrozen-size", type=int, default=200, help="Size of the run with trained encoders (0: none)."
    )
    parser.add_argument("--holdout", type=int, default=200, help="Held-out images (never used by a run).")
    parser.add_argument("--epochs", type=int, default=5, help="Fine-tuning epochs.")
    parser.add_argument("--split-seed", type=int, default=0, help="Seed of the held-out part and of the subsets.")
    parser.add_argument("--resamples", type=int, default=1000, help="Bootstrap resamples.")
    parser.add_argument("--batch-size", type=int, default=16, help="Training batch size.")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    import numpy as np
    import pandas as pd
    from release_report import bootstrap
    from transformers import pipeline

    import modeling_skinlesion
    from modeling_skinlesion.training import finetune, load_clinic
    from modeling_skinlesion.training.finetuning import collapse_probabilities

    modeling_skinlesion.register()
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)

    # The clinic: folder + CSV, a fixed held-out part, nested subsets of the rest -------------------------------------
    manifest = pd.read_csv(args.isic2017_root / "manifest.csv", dtype={"image_id": str})
    unlabelled = manifest["diagnosis"].isna()
    if unlabelled.any():
        logger.info(
            f"Leaving out {int(unlabelled.sum())} images without a diagnosis: {list(manifest['image_id'][unlabelled])}"
        )
        manifest = manifest[~unlabelled].reset_index(drop=True)
    table = pd.DataFrame(
        {
            "file": manifest["image_id"] + ".jpg",
            "diagnosis": manifest["diagnosis"].map({"melanoma": "mel", "nevus": "nv"}),
            "age": manifest["age_approx"].fillna(manifest["isic2019_age_approx"]),
            "sex": manifest["sex"].fillna(manifest["isic2019_sex"]),
            "site": manifest["isic2019_anatom_site_general"],
        }
    )
    if table["diagnosis"].isna().any():
        raise ValueError(
            f"Unexpected diagnoses in {args.isic2017_root / 'manifest.csv'}: {set(manifest['diagnosis'])}"
        )
    rng = np.random.default_rng(args.split_seed)
    order = rng.permutation(len(table))
    holdout, pool = [], []
    for name in CLASSES:  # stratified: the held-out part keeps the class shares
        members = [i for i in order if table["diagnosis"].iloc[i] == name]
        take = round(args.holdout * len(members) / len(table))
        holdout += members[:take]
        pool += members[take:]
    pool = [i for i in order if i in set(pool)]  # one shuffle of the rest, classes interleaved
    if max(args.sizes + [args.unfrozen_size]) > len(pool):
        raise ValueError(f"At most {len(pool)} images remain beside the held-out part; got sizes {args.sizes}.")
    table.iloc[holdout].to_csv(out / "holdout.csv", index=False)
    images = args.isic2017_root / "images"

    def score_holdout(model_path: str, collapse: bool) -> dict:
        """Held-out images through the pipeline; scores with bootstrap intervals."""
        analyse = pipeline("skin-lesion-analysis", model=model_path, trust_remote_code=True)
        config = analyse.model.config
        names = [config.id2label[i] for i in range(config.num_labels)]
        rows = table.iloc[holdout]
        inputs = [
            {"image": str(images / row.file), "metadata": {"age": row.age, "sex": row.sex, "site": row.site}}
            for row in rows.itertuples()
        ]
        results = analyse(inputs, explain=False, batch_size=16)
        p = np.array([[r["probabilities"][n] for n in names] for r in results], dtype=np.float64)
        if collapse:
            p = collapse_probabilities(p, names, CLASSES, {name: [name] for name in CLASSES})
        else:
            p = p[:, [names.index(name) for name in CLASSES]]
        y = np.array([CLASSES.index(d) for d in rows["diagnosis"]])
        gate = [r.get("in_distribution") for r in results]

        def auc(positive: np.ndarray, score: np.ndarray) -> float:
            """Mann-Whitney: the chance a positive case scores above a negative one (ties count half)."""
            pos, neg = score[positive], score[~positive]
            return float(
                ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
            )

        def scores(p: np.ndarray, y: np.ndarray) -> dict:
            predicted = p.argmax(1)
            present = np.unique(y)
            mel = y == 0
            return {
                "balanced_accuracy": float(np.mean([(predicted[y == k] == k).mean() for k in present])),
                "melanoma_auc": auc(mel, p[:, 0]) if 0 < mel.sum() < len(y) else None,
                "melanoma_sensitivity": float((predicted[mel] == 0).mean()) if mel.any() else None,
                "specificity": float((predicted[~mel] == 1).mean()) if (~mel).any() else None,
            }

        ids = list(rows["file"])
        return {
            **scores(p, y),
            "intervals_95": bootstrap(p, y, ids, scores, args.resamples, args.split_seed),
            "images": len(y),
            "melanoma_images": int((y == 0).sum()),
            "gate_accepted": None if None in gate else float(np.mean(gate)),
        }

    results = {
        "checkpoint": args.checkpoint,
        "clinic": f"ISIC 2017 shared copy ({len(table)} images: {dict(table['diagnosis'].value_counts())})",
        "holdout": {"images": len(holdout), "classes": dict(table.iloc[holdout]["diagnosis"].value_counts())},
        "pool": len(pool),
        "command": "python scripts/clinic_learning_curve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "runs": [],
    }
    path = out / "learning-curve.json"
    previous = {run["name"]: run for run in json.loads(path.read_text())["runs"]} if path.is_file() else {}

    def record(entry: dict) -> None:
        results["runs"].append(entry)
        path.write_text(json.dumps(results, indent=1, default=str))

    if "zero-shot" in previous:
        record(previous["zero-shot"])
    else:
        start = time.perf_counter()
        record({"name": "zero-shot", "size": 0, "frozen": None, "held_out": score_holdout(args.checkpoint, True),
                "score_s": time.perf_counter() - start})  # fmt: skip
    logger.info(f"zero-shot: {results['runs'][-1]['held_out']}")

    plan = [(n, True) for n in args.sizes] + ([(args.unfrozen_size, False)] if args.unfrozen_size else [])
    for size, frozen in plan:
        name = f"{size}-{'frozen' if frozen else 'unfrozen'}"
        run_dir = out / "runs" / name
        if name in previous and (run_dir / "metrics.json").is_file():
            record(previous[name])
            continue
        subset = table.iloc[pool[:size]]
        subset.to_csv(out / f"clinic-{size}.csv", index=False)
        data = load_clinic(
            images,
            out / f"clinic-{size}.csv",
            column_map={"image": "file", "label": "diagnosis", "age": "age", "sex": "sex", "site": "site"},
            labels=CLASSES,
            source=f"isic2017-clinic-{size}",
        )
        start = time.perf_counter()
        _, report = finetune(
            args.checkpoint, data, run_dir, freeze_encoders=frozen, epochs=args.epochs, batch_size=args.batch_size,
            checkpointing_steps="epoch", resume="latest" if (run_dir / "checkpoints").is_dir() else None,
        )  # fmt: skip
        wall = time.perf_counter() - start
        record(
            {
                "name": name,
                "size": size,
                "frozen": frozen,
                "finetune_wall_s": wall,
                "kept_starting_model": report["kept_starting_model"],
                "best_epoch": report["best"]["epoch"] + 1,
                "validation_before": report["before"]["balanced_accuracy"],
                "validation_after": report["after"]["balanced_accuracy"],
                "split": {key: value["images"] for key, value in report["split"].items()},
                "held_out": score_holdout(str(run_dir), False),
            }
        )
        logger.info(f"{name}: {wall:.0f} s, held-out {results['runs'][-1]['held_out']}")

    plot(results, out / "learning-curve.png")
    logger.info(f"Wrote {path} and {out / 'learning-curve.png'}")
    return results


def plot(results: dict, path: Path) -> None:
    """Balanced accuracy and melanoma AUC on the held-out part against the clinic images used, with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("balanced_accuracy", "melanoma_auc"), ("Balanced accuracy", "Melanoma AUC")):
        for frozen, style, label in ((True, "o-", "frozen encoders (cached)"), (False, "s", "encoders trained")):
            runs = [r for r in results["runs"] if r["frozen"] is frozen or (frozen and r["frozen"] is None)]
            xs = [r["size"] for r in runs]
            ys = [r["held_out"][key] for r in runs]
            low = [r["held_out"][key] - r["held_out"]["intervals_95"][key][0] for r in runs]
            high = [r["held_out"]["intervals_95"][key][1] - r["held_out"][key] for r in runs]
            if runs:
                ax.errorbar(xs, ys, yerr=[low, high], fmt=style, capsize=3, label=label)
        ax.set_xlabel("clinic images used (0 = zero-shot)")
        ax.set_title(f"{title} on {results['holdout']['images']} held-out ISIC 2017 images")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
