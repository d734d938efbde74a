"""Grouped, stratified splits (a lesion or patient never on two sides), the leak check, and class counts."""

import math
from collections import Counter, defaultdict
from collections.abc import Mapping

import datasets
import numpy as np

from .schema import column_values, label_names


def grouped_split(
    dataset: datasets.Dataset,
    val_size: float = 0.15,
    test_size: float = 0.0,
    seed: int = 0,
    group_column: str = "group_id",
    stratify_column: str | None = "label",
) -> datasets.DatasetDict:
    """Split by group (lesion or patient), stratified by `stratify_column`, reproducibly from `seed`.

    All images of a group go to one split. Within each stratum (the majority class of a group), the groups are
    shuffled and each goes to the split whose image count is furthest below its target, so every split gets about
    `val_size` / `test_size` of every class; a class too rare for a share stays in train. Returns a `DatasetDict`
    with `train`, `validation` and (when `test_size > 0`) `test`, and checks it with `check_no_group_leak`.
    """
    for name, value in (("val_size", val_size), ("test_size", test_size)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"`{name}` must lie in [0, 1), got {value}.")
    if val_size + test_size >= 1.0:
        raise ValueError(f"`val_size` + `test_size` must be below 1, got {val_size} + {test_size}.")
    for column in (group_column, stratify_column):
        if column is not None and column not in dataset.column_names:
            raise ValueError(f"Column {column!r} is not in the dataset; its columns are {dataset.column_names}.")
    groups = [str(g) for g in column_values(dataset, group_column)]
    strata = (
        [str(s) for s in column_values(dataset, stratify_column)]
        if stratify_column is not None
        else [""] * len(groups)
    )
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for group in sorted(members):
        stratum = Counter(strata[i] for i in members[group]).most_common(1)[0][0]
        by_stratum[stratum].append(group)
    fractions = {"train": 1.0 - val_size - test_size, "validation": val_size, "test": test_size}
    rng = np.random.default_rng(seed)
    assignment: dict[str, list[int]] = {name: [] for name in fractions}
    for stratum in sorted(by_stratum):
        stratum_groups = by_stratum[stratum]
        order = rng.permutation(len(stratum_groups))
        total = sum(len(members[g]) for g in stratum_groups)
        counts = dict.fromkeys(fractions, 0)
        for position in order:
            group = stratum_groups[position]
            # Deficit of each split against its target; ties go to train (listed first).
            split = max(fractions, key=lambda s: fractions[s] * total - counts[s] if fractions[s] > 0 else -math.inf)
            counts[split] += len(members[group])
            assignment[split].extend(members[group])
    result = datasets.DatasetDict(
        {
            name: dataset.select(sorted(indices))
            for name, indices in assignment.items()
            if name != "test" or test_size > 0
        }
    )
    check_no_group_leak(result, group_column)
    return result


def check_no_group_leak(dataset_dict: Mapping[str, datasets.Dataset], group_column: str = "group_id") -> None:
    """Raise a `ValueError` naming the groups that appear in more than one split."""
    seen: dict[str, str] = {}
    leaks: dict[str, set[str]] = defaultdict(set)
    for split, dataset in dataset_dict.items():
        if group_column not in dataset.column_names:
            raise ValueError(
                f"Split {split!r} has no {group_column!r} column; its columns are {dataset.column_names}."
            )
        for group in set(column_values(dataset, group_column)):
            if group in seen and seen[group] != split:
                leaks[group].update({seen[group], split})
            seen.setdefault(group, split)
    if leaks:
        shown = "; ".join(f"{g} in {sorted(s)}" for g, s in sorted(leaks.items())[:20])
        more = f" and {len(leaks) - 20} more" if len(leaks) > 20 else ""
        raise ValueError(
            f"{len(leaks)} {group_column} value(s) appear in more than one split: {shown}{more}. A lesion (or "
            "patient) on two sides of a split leaks information; split with `grouped_split`."
        )


def class_counts(dataset: datasets.Dataset) -> list[int]:
    """Number of rows of each class (rows with label -1 are not counted)."""
    counts = Counter(column_values(dataset, "label"))
    return [counts.get(i, 0) for i in range(len(label_names(dataset)))]


def balanced_class_weights(dataset: datasets.Dataset) -> list[float]:
    """`n / (k * n_c)` per class over the classes present (as scikit-learn's "balanced"); 1.0 for absent classes."""
    counts = class_counts(dataset)
    present = [c for c in counts if c > 0]
    if not present:
        raise ValueError("The dataset has no labelled rows; class weights need labels.")
    total = sum(present)
    return [total / (len(present) * c) if c > 0 else 1.0 for c in counts]
