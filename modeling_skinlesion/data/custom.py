"""Data in any other layout: a folder of images plus a CSV (`load_clinic`), or any `datasets.Dataset` such as a Hub
dataset (`map_columns`, `load_hub`), with a column map naming its columns."""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd

from .schema import (
    CLINIC_COLUMNS,
    IMAGE_EXTENSIONS,
    OnMissing,
    _build,
    _check_dir,
    _check_on_missing,
    _clean_age,
    _clean_string,
    _empty_rows,
    _index_files,
    _report_missing,
)


def _check_column_map(column_map: Mapping[str, str] | None, available: Sequence[str], where: str) -> dict[str, str]:
    column_map = dict(column_map or {})
    unknown_keys = sorted(set(column_map) - set(CLINIC_COLUMNS))
    if unknown_keys:
        raise ValueError(
            f"`column_map` has unknown keys {unknown_keys}; valid keys are {list(CLINIC_COLUMNS)} "
            f"(each maps to a column of {where})."
        )
    if "image" not in column_map:
        raise ValueError(
            f"`column_map` must map 'image' to the column of {where} that holds the images; its columns are "
            f"{list(available)}."
        )
    absent = {key: column for key, column in column_map.items() if column not in available}
    if absent:
        raise ValueError(
            f"`column_map` names columns that {where} does not have: {absent}. Its columns are {list(available)}."
        )
    return column_map


def _label_indices(values: list[Any], names: Sequence[str] | None, where: str) -> tuple[list[int], list[str]]:
    """Class indices (-1 for missing) and the class names, from raw label values (names or integers)."""
    cleaned = [None if _clean_string(v) is None else v for v in values]
    present = [v for v in cleaned if v is not None]
    if names is None:
        if all(isinstance(v, (int, np.integer)) for v in present):
            names = [str(i) for i in range(max(present, default=-1) + 1)]
        else:
            names = sorted({str(v).strip() for v in present})
    names = list(names)
    if not names:
        raise ValueError(f"{where} has no labels; pass `label_names` or map a label column.")
    lookup = {name: i for i, name in enumerate(names)}
    indices, unknown = [], set()
    for value in cleaned:
        if value is None:
            indices.append(-1)
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            if not 0 <= value < len(names):
                unknown.add(str(value))
            indices.append(int(value))
        elif str(value).strip() in lookup:
            indices.append(lookup[str(value).strip()])
        else:
            unknown.add(str(value).strip())
    if unknown:
        raise ValueError(f"{where} has labels {sorted(unknown)} that are not in `label_names` {names}.")
    return indices, names


def load_clinic(
    images_dir: str | os.PathLike,
    csv_path: str | os.PathLike,
    column_map: Mapping[str, str],
    label_names: Sequence[str] | None = None,
    masks_dir: str | os.PathLike | None = None,
    source: str = "clinic",
    on_missing: OnMissing = "skip",
) -> datasets.Dataset:
    """A folder of images plus a CSV whose columns are named by `column_map`.

    Args:
        images_dir: folder of images; the image column holds file names relative to it (sub-folders allowed), with
            or without extension, or absolute paths.
        csv_path: the CSV, one row per image.
        column_map: our column → the CSV's column, e.g.
            `{"image": "file", "label": "diagnosis", "age": "age", "sex": "gender", "site": "body_site",
            "group_id": "patient", "mask": "mask_file"}`. Only `"image"` is required; unmapped fields are missing
            (`label` -1, `age` NaN, `group_id` the image id).
        label_names: the class order; default: the sorted distinct label values (integers 0..k-1 if integers).
        masks_dir: folder the mask column is relative to (default `images_dir`).
        source: the `source` value of every row.
        on_missing: rows whose image file is absent are dropped with a warning naming them, or raise.
    """
    images_dir = _check_dir(images_dir, "images_dir")
    masks_dir = _check_dir(masks_dir, "masks_dir") if masks_dir is not None else images_dir
    _check_on_missing(on_missing)
    if not Path(csv_path).is_file():
        raise ValueError(f"`csv_path` must be an existing CSV file, got {str(csv_path)!r}.")
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    column_map = _check_column_map(column_map, list(table.columns), f"the CSV {csv_path}")
    files = _index_files(images_dir)
    by_name = {str(p.relative_to(images_dir)): p for p in files.values()}

    def resolve(value: str, folder: Path) -> Path | None:
        value = value.strip()
        if not value:
            return None
        candidate = Path(value) if os.path.isabs(value) else folder / value
        if candidate.is_file():
            return candidate
        if folder == images_dir:
            found = by_name.get(value) or files.get(Path(value).stem if Path(value).suffix else value)
            if found is not None and (not Path(value).suffix or found.name == Path(value).name):
                return found
        for ext in IMAGE_EXTENSIONS:
            if (folder / (value + ext)).is_file():
                return folder / (value + ext)
        return None

    n = len(table)
    get = {key: table[column].tolist() for key, column in column_map.items()}
    labels, names = (
        _label_indices(get["label"], label_names, f"the CSV {csv_path}")
        if "label" in get
        else (
            [-1] * n,
            list(label_names) if label_names else ["unlabelled"],
        )
    )
    rows, missing = _empty_rows(), []
    for i in range(n):
        raw = str(get["image"][i])
        path = resolve(raw, images_dir)
        if path is None:
            missing.append(raw)
            continue
        image_id = _clean_string(get["image_id"][i]) if "image_id" in get else None
        image_id = image_id or Path(raw.strip()).stem
        mask = resolve(str(get["mask"][i]), masks_dir) if "mask" in get else None
        rows["image"].append(str(path))
        rows["mask"].append(str(mask) if mask is not None else None)
        rows["label"].append(labels[i])
        rows["age"].append(_clean_age(get["age"][i]) if "age" in get else float("nan"))
        rows["sex"].append(_clean_string(get["sex"][i]) if "sex" in get else None)
        rows["site"].append(_clean_string(get["site"][i]) if "site" in get else None)
        rows["group_id"].append((_clean_string(get["group_id"][i]) if "group_id" in get else None) or image_id)
        rows["source"].append(source)
        rows["image_id"].append(image_id)
    _report_missing(missing, f"images listed in {Path(csv_path).name} (looked in {images_dir})", source, on_missing)
    return _build(rows, names)


def map_columns(
    dataset: datasets.Dataset,
    column_map: Mapping[str, str],
    label_names: Sequence[str] | None = None,
    source: str = "hub",
) -> datasets.Dataset:
    """Bring any `datasets.Dataset` (e.g. from the Hub) into the unified schema, `column_map` naming its columns as in
    `load_clinic`. Image and mask columns may be `datasets.Image` features (bytes or paths) or path strings; a
    `ClassLabel` label keeps its names unless `label_names` is given. Images are not decoded."""
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"`dataset` must be a datasets.Dataset, got {type(dataset).__name__}.")
    column_map = _check_column_map(column_map, dataset.column_names, "the dataset")
    n = len(dataset)
    raw = dataset.select_columns(list(dict.fromkeys(column_map.values())))
    for key in ("image", "mask"):
        column = column_map.get(key)
        if column is not None and isinstance(raw.features[column], datasets.Image):
            raw = raw.cast_column(column, datasets.Image(decode=False))
    data = raw.to_dict()
    get = {key: data[column] for key, column in column_map.items()}

    def image_value(value: Any) -> Any:
        if value is None or isinstance(value, dict):
            return value
        return str(value)

    if "label" in get:
        feature = dataset.features[column_map["label"]]
        if isinstance(feature, datasets.ClassLabel) and label_names is None:
            labels, names = list(get["label"]), list(feature.names)
        elif isinstance(feature, datasets.ClassLabel):
            labels, names = _label_indices(
                [feature.int2str(v) if v >= 0 else None for v in get["label"]], label_names, "the dataset"
            )
        else:
            labels, names = _label_indices(get["label"], label_names, "the dataset")
    else:
        labels, names = [-1] * n, list(label_names) if label_names else ["unlabelled"]

    def image_id(i: int) -> str:
        if "image_id" in get and _clean_string(get["image_id"][i]):
            return str(get["image_id"][i]).strip()
        value = get["image"][i]
        path = value.get("path") if isinstance(value, dict) else value
        return Path(path).stem if path else f"{source}-{i}"

    ids = [image_id(i) for i in range(n)]
    rows = {
        "image": [image_value(v) for v in get["image"]],
        "mask": [image_value(v) for v in get["mask"]] if "mask" in get else [None] * n,
        "label": labels,
        "age": [_clean_age(v) for v in get["age"]] if "age" in get else [float("nan")] * n,
        "sex": [_clean_string(v) for v in get["sex"]] if "sex" in get else [None] * n,
        "site": [_clean_string(v) for v in get["site"]] if "site" in get else [None] * n,
        "group_id": [_clean_string(g) or i for g, i in zip(get["group_id"], ids)] if "group_id" in get else ids,
        "source": [source] * n,
        "image_id": ids,
    }
    return _build(rows, names)


def load_hub(
    dataset_id: str,
    split: str = "train",
    column_map: Mapping[str, str] | None = None,
    label_names: Sequence[str] | None = None,
    **load_kwargs: Any,
) -> datasets.Dataset:
    """`datasets.load_dataset(dataset_id, split=split)` brought into the unified schema with `map_columns`.
    Needs the Hub (or a local dataset folder/script path as `dataset_id`)."""
    if column_map is None:
        column_map = {"image": "image", "label": "label"}
    try:
        dataset = datasets.load_dataset(dataset_id, split=split, **load_kwargs)
    except (ConnectionError, OSError) as error:
        raise ValueError(
            f"Could not load the dataset {dataset_id!r} (split {split!r}): {error}. Loading a Hub dataset needs a "
            "network connection (and `HF_HUB_OFFLINE` unset); for local files use `load_clinic`."
        ) from error
    return map_columns(dataset, column_map, label_names=label_names, source=dataset_id)
