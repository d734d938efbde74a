#!/usr/bin/env python
"""Write the lesion-grouped split a training run would make, without training (a splits.json).

    python scripts/make_splits.py --dataset ham10000 --data-root ../shared/data/ham10000 \
        --val-size 0.1 --test-size 0.1 --split-seed 0 --output runs/release/classifier-splits.json

The split is `train_classifier.py`'s (same loader, grouping, stratification by class and seed), so another run can
keep its validation and test lesions out of training: `train_segmenter.py --holdout-splits FILE` puts them in the
segmenter's own validation/test splits, and the classifier trained later with the same options makes the same split
(its `splits.json` equals this file's ids).
"""

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", required=True, help="Data source(s), as for training.")
    parser.add_argument("--data-root", action="append", required=True, help="Root folder of each --dataset.")
    parser.add_argument("--val-size", type=float, default=0.15, help="Share of the lesions for validation.")
    parser.add_argument("--test-size", type=float, default=0.0, help="Share of the lesions held out for testing.")
    parser.add_argument("--split-seed", type=int, default=0, help="Seed of the grouped split.")
    parser.add_argument("--output", type=Path, required=True, help="Where to write the splits.json.")
    args = parser.parse_args(argv)

    from accelerate import PartialState

    PartialState()  # the training helpers log through Accelerate
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _training as T

    options = T.TrainingArguments(
        config="",
        output_dir=str(args.output.parent),
        dataset=args.dataset,
        data_root=args.data_root,
        val_size=args.val_size,
        test_size=args.test_size,
        split_seed=args.split_seed,
    )
    dataset = T.load_sources(options, "classification")
    splits, _ = T.prepare_splits(options, dataset, stratify_column="label", require_masks=False)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    T.write_split_ids(args.output, splits, options)
    print(f"Wrote {args.output}: " + ", ".join(f"{name} {len(split)} images" for name, split in splits.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
