#!/usr/bin/env python
r"""Calibrate a trained classifier on held-out data, stored in its folder: post-hoc logit adjustment and temperature,
and with --refit-trust the referral threshold and the out-of-distribution gate too.

    python scripts/calibrate.py --model runs/release/classifier --dataset ham10000 \
        --data-root ../shared/data/ham10000 --splits-file runs/release/classifier/splits.json --tune-logit-bias

    # a clinic's folder + CSV: everything refitted for its population
    python scripts/calibrate.py --model runs/clinic --dataset clinic --data-root clinic/photos \
        --clinic-csv clinic/cases.csv --column-map image=file label=diagnosis age=age \
        --splits-file runs/clinic/splits.json --tune-logit-bias --refit-trust

The validation split of `--splits-file` (or all images of the data given, e.g. a clinic's own held-out cases) goes
through the model's ordinary forward (its own lesion masks, as at inference) with the current bias and temperature
removed; then `fit_calibration` (of `modeling_skinlesion.training.evaluation`, the one `train_classifier.py` uses)
fits the bias (with `--tune-logit-bias`) and the temperature, writes them into the model folder's config.json and
records them under `calibration` in its metrics.json.

With `--refit-trust` (`modeling_skinlesion.training.calibration.recalibrate`, what fine-tuning runs): also the
referral threshold (on the validation images, for `--referral-sensitivity`) and the out-of-distribution gate
(statistics on the train images, threshold at `--ood-accept-rate` of the validation images). Its train and validation
images come from `--splits-file`, or without one from a lesion-grouped split of the data given (`--val-size`); the
model is saved again (the gate's statistics are weights) and its card states what was refitted on how many images.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modeling_skinlesion.cli import HelpFormatter  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="Trained classifier folder (rewritten in place).")
    parser.add_argument("--dataset", default="ham10000", help="Data source, as for training ('clinic': folder + CSV).")
    parser.add_argument("--data-root", required=True, help="Root folder of the data (the images folder for 'clinic').")
    parser.add_argument("--clinic-csv", help="With --dataset clinic: the CSV, one row per image.")
    parser.add_argument(
        "--column-map", nargs="+", default=[], metavar="KEY=COLUMN", help="With --dataset clinic: CSV columns."
    )
    parser.add_argument("--splits-file", help="splits.json whose `validation` ids to use (unset: all images).")
    parser.add_argument("--tune-logit-bias", action="store_true", help="Also fit the post-hoc logit adjustment.")
    parser.add_argument(
        "--refit-trust", action="store_true", help="Also refit the referral threshold and out-of-distribution gate."
    )
    parser.add_argument(
        "--val-size", type=float, default=0.5, help="--refit-trust without --splits-file: share held out."
    )
    parser.add_argument("--referral-sensitivity", type=float, default=0.90, help="Target sensitivity of the referral.")
    parser.add_argument("--ood-accept-rate", type=float, default=0.99, help="Validation share the gate accepts.")
    parser.add_argument("--population", help="Name of the data in the config and card (default: --dataset).")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per forward pass.")
    args = parser.parse_args(argv)
    if args.dataset == "clinic" and (not args.clinic_csv or not any(p.startswith("image=") for p in args.column_map)):
        parser.error("--dataset clinic needs --clinic-csv and --column-map image=COLUMN label=COLUMN ...")
    if any("=" not in pair for pair in args.column_map):
        parser.error(f"--column-map entries must be KEY=COLUMN, got {args.column_map}")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    import numpy as np
    import torch
    from accelerate import Accelerator

    from modeling_skinlesion import SkinDualNet, SkinLesionImageProcessor, SkinLesionMetadataProcessor
    from modeling_skinlesion.data import (
        SkinLesionTransform,
        build_dataloader,
        class_counts,
        column_values,
        grouped_split,
        load_source,
    )
    from modeling_skinlesion.training import loop as T
    from modeling_skinlesion.training.calibration import recalibrate
    from modeling_skinlesion.training.evaluation import fit_calibration, image_forward, predict_logits

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = SkinDualNet.from_pretrained(args.model).eval()
    options = {"masks": "optional"}
    if args.dataset == "clinic":
        options = {
            "csv_path": args.clinic_csv,
            "column_map": dict(pair.split("=", 1) for pair in args.column_map),
            # the model's classes, in its order: a label it does not know is an error naming it
            "label_names": [model.config.id2label[i] for i in range(model.config.num_labels)],
        }
    dataset = T.keep_labelled(load_source(args.dataset, args.data_root, **options))
    processor = SkinLesionImageProcessor.from_pretrained(args.model)
    metadata = SkinLesionMetadataProcessor.from_config(model.config)
    transform = SkinLesionTransform(processor, metadata_processor=metadata)
    ids = column_values(dataset, "image_id")
    recorded = json.loads(Path(args.splits_file).read_text()) if args.splits_file else None
    metrics_path = args.model / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}

    if args.refit_trust:
        if recorded is not None:
            splits = {
                name: dataset.select([i for i, x in enumerate(ids) if x in set(recorded.get(name, []))])
                for name in ("train", "validation")
            }
        else:
            splits = grouped_split(dataset, val_size=args.val_size, seed=0, stratify_column="label")
        population = args.population or args.dataset
        report = recalibrate(
            model, splits, transform, accelerator, args.batch_size, population,
            tune_logit_bias=args.tune_logit_bias, referral_sensitivity=args.referral_sensitivity,
            ood_accept_rate=args.ood_accept_rate,
        )  # fmt: skip
        model.save_pretrained(args.model)
        metrics["calibration"] = report
        T.write_json(metrics_path, metrics)
        card = args.model / "README.md"
        if card.is_file():  # the card states what was refitted (a section at its end, replaced when run again)
            head = card.read_text().split("\n## Recalibrated for ")[0].rstrip("\n")
            card.write_text(
                f"{head}\n\n## Recalibrated for {population}\n\n{report['summary']} "
                "(`scripts/calibrate.py --refit-trust`).\n"
            )
        print(json.dumps({"summary": report["summary"], "temperature": model.config.temperature}))
        return 0 if np.isfinite(model.config.temperature) else 1

    model.config.logit_bias, model.config.temperature = None, 1.0  # raw logits for the fit
    train_counts = None
    if recorded is not None:
        wanted = set(recorded["validation"])
        train_ids = set(recorded.get("train", []))
        train_counts = class_counts(dataset.select([i for i, x in enumerate(ids) if x in train_ids]))
        dataset = dataset.select([i for i, x in enumerate(ids) if x in wanted])
    if train_counts is None or not sum(train_counts):
        train_counts = list(metrics["split"]["train"]["class_counts"].values())
    loader = build_dataloader(dataset, transform, args.batch_size)
    logits, labels = predict_logits(
        model, loader, accelerator, lambda m, batch: image_forward(m, batch, use_ground_truth=False)
    )
    logging.info(f"{len(labels)} held-out images")
    report = fit_calibration(model.config, logits, labels, train_counts, args.tune_logit_bias, True)
    model.config.save_pretrained(args.model)
    metrics["calibration"] = report
    T.write_json(metrics_path, metrics)
    print(json.dumps({k: v for k, v in report.items() if k != "balanced_accuracy_by_tau"}, default=float))
    return 0 if np.isfinite(report["temperature"]) else 1


if __name__ == "__main__":
    sys.exit(main())
