#!/usr/bin/env python
r"""Calibrate a trained classifier on held-out data: post-hoc logit adjustment and temperature, stored in its config.

    python scripts/calibrate.py --model runs/release/classifier --dataset ham10000 \
        --data-root ../shared/data/ham10000 --splits-file runs/release/classifier/splits.json --tune-logit-bias

The validation split of `--splits-file` (or all images of the data given, e.g. a clinic's own held-out cases) goes
through the model's ordinary forward (its own lesion masks, as at inference) with the current bias and temperature
removed; then `fit_calibration` (of `_evaluation.py`, the one `train_classifier.py` uses) fits the bias (with
`--tune-logit-bias`) and the temperature, writes them into the model folder's config.json and records them under
`calibration` in its metrics.json.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _help import HelpFormatter  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="Trained classifier folder (rewritten in place).")
    parser.add_argument("--dataset", default="ham10000", help="Data source, as for training.")
    parser.add_argument("--data-root", required=True, help="Root folder of the data.")
    parser.add_argument("--splits-file", help="splits.json whose `validation` ids to use (unset: all images).")
    parser.add_argument("--tune-logit-bias", action="store_true", help="Also fit the post-hoc logit adjustment.")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per forward pass.")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    import _training as T
    import numpy as np
    import torch
    from _evaluation import fit_calibration, image_forward, predict_logits
    from accelerate import Accelerator

    from modeling_skinlesion import SkinDualNet, SkinLesionImageProcessor, SkinLesionMetadataProcessor
    from modeling_skinlesion.data import (
        SkinLesionTransform,
        build_dataloader,
        class_counts,
        column_values,
        load_source,
    )

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = SkinDualNet.from_pretrained(args.model).eval()
    model.config.logit_bias, model.config.temperature = None, 1.0  # raw logits for the fit
    dataset = load_source(args.dataset, args.data_root, masks="optional")
    train_counts = None
    if args.splits_file:
        recorded = json.loads(Path(args.splits_file).read_text())
        ids = column_values(dataset, "image_id")
        wanted = set(recorded["validation"])
        train_ids = set(recorded.get("train", []))
        train_counts = class_counts(dataset.select([i for i, x in enumerate(ids) if x in train_ids]))
        dataset = dataset.select([i for i, x in enumerate(ids) if x in wanted])
    if train_counts is None or not sum(train_counts):
        metrics = json.loads((args.model / "metrics.json").read_text())
        train_counts = list(metrics["split"]["train"]["class_counts"].values())
    processor = SkinLesionImageProcessor.from_pretrained(args.model)
    metadata = SkinLesionMetadataProcessor.from_config(model.config)
    loader = build_dataloader(dataset, SkinLesionTransform(processor, metadata_processor=metadata), args.batch_size)
    logits, labels = predict_logits(
        model, loader, accelerator, lambda m, batch: image_forward(m, batch, use_ground_truth=False)
    )
    logging.info(f"{len(labels)} held-out images")
    report = fit_calibration(model.config, logits, labels, train_counts, args.tune_logit_bias, True)
    model.config.save_pretrained(args.model)
    metrics_path = args.model / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics["calibration"] = report
    T.write_json(metrics_path, metrics)
    print(json.dumps({k: v for k, v in report.items() if k != "balanced_accuracy_by_tau"}, default=float))
    return 0 if np.isfinite(report["temperature"]) else 1


if __name__ == "__main__":
    sys.exit(main())
