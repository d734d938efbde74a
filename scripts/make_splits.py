#!/usr/bin/env python
r"""Write the lesion-grouped split a training run would make, without training (a splits.json).

    python scripts/make_splits.py --dataset ham10000 --data-root ../shared/data/ham10000 \
        --val-size 0.1 --test-size 0.1 --split-seed 0 --output runs/release/classifier-splits.json

The split is `train_classifier.py`'s (same loader, grouping, stratification by class and seed), so another run can
keep its validation and test lesions out of training: `train_segmenter.py --holdout-splits FILE` puts them in the
segmenter's own validation/test splits, and the classifier trained later with the same options makes the same split
(its `splits.json` equals this file's ids).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from modeling_skinlesion.training.arguments import (  # noqa: E402
    DataArguments,
    SplitArguments,
    TrainingArguments,
    parse_arguments,
    with_default,
)


@dataclass(kw_only=True)
class MakeSplitsArguments(DataArguments, SplitArguments):
    _argument_group_name = "output"

    output: str = field(metadata={"help": "Where to write the splits.json."})
    # The classifier's training-image cap, so a capped run's split can be written too.
    max_train_samples: int | None = with_default(TrainingArguments, "max_train_samples", None)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(MakeSplitsArguments, argv, description=__doc__)

    from accelerate import PartialState

    from modeling_skinlesion.training import loop as T

    PartialState()  # the data helpers log through Accelerate
    dataset = T.load_sources(args, "classification")
    splits, _ = T.prepare_splits(args, dataset, stratify_column="label", require_masks=False)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    T.write_split_ids(output, splits, args, args.dataset, args.data_root)
    print(f"Wrote {output}: " + ", ".join(f"{name} {len(split)} images" for name, split in splits.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
