"""The one dataset dispatch: `load_source(name, root, **kwargs)` over `LOADERS`, and `concatenate_sources`."""

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import datasets

from .custom import load_clinic, load_hub
from .isic import load_ham10000, load_isic2016_task1, load_isic2017, load_isic2018_task1, load_isic2019
from .ph2 import load_ph2
from .schema import dataset_features, label_names

# Every loader takes the dataset location first. The official layouts share the keywords `masks` (True /
# "optional" / False), `labels` (the label set) and `on_missing`; those with official splits also take `split`.
# `clinic` takes the images folder as `root` plus `csv_path` and `column_map`; `hub` takes the dataset id as `root`
# plus `split` and `column_map`.
LOADERS: dict[str, Callable[..., datasets.Dataset]] = {
    "ham10000": load_ham10000,
    "isic2016_task1": load_isic2016_task1,
    "isic2017": load_isic2017,
    "isic2018_task1": load_isic2018_task1,
    "isic2019": load_isic2019,
    "ph2": load_ph2,
    "clinic": load_clinic,
    "hub": load_hub,
}


def load_source(name: str, root: str | os.PathLike, **kwargs: Any) -> datasets.Dataset:
    """Load the dataset `name` (a key of `LOADERS`) from `root` (a folder; the dataset id for `hub`); `kwargs` go
    to its loader. A keyword the loader does not take is refused with the list of those it does."""
    if name not in LOADERS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(LOADERS)}.")
    loader = LOADERS[name]
    parameters = list(inspect.signature(loader).parameters.values())
    accepted = [p.name for p in parameters[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    unknown = sorted(set(kwargs) - set(accepted)) if not takes_any else []
    if unknown:
        raise ValueError(f"Dataset {name!r} does not take {unknown}; its loader {loader.__name__} takes {accepted}.")
    return loader(root, **kwargs)


def concatenate_sources(parts: Sequence[datasets.Dataset], drop_labels: bool = False) -> datasets.Dataset:
    """Concatenate datasets in the unified schema. Their label names must match, unless `drop_labels` (for
    segmentation) sets every label to -1 under the first part's names."""
    parts = list(parts)
    if not parts:
        raise ValueError("`parts` is empty; pass at least one dataset.")
    names = [label_names(part) for part in parts]
    if drop_labels:
        features = dataset_features(names[0])
        parts = [
            part.map(lambda batch: {"label": [-1] * len(batch["label"])}, batched=True).cast(features)
            for part in parts
        ]
    elif any(n != names[0] for n in names[1:]):
        raise ValueError(
            f"The datasets have different label names {names}; load them with the same label set "
            "(e.g. `load_ham10000(root, labels='isic2019')` with ISIC 2019) or pass `drop_labels=True`."
        )
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
