"""Data for skin-dualnet: loaders for the official dermoscopy layouts, grouped splits, file checks, joint augmentation
of images and masks, and the collate function the training scripts use.

Every loader returns a `datasets.Dataset` with one schema (see `dataset_features`):

| column     | feature                          | meaning                                                        |
| ---------- | -------------------------------- | -------------------------------------------------------------- |
| `image`    | `datasets.Image()`               | the image file path, decoded lazily on access                  |
| `mask`     | `datasets.Image()`               | the lesion mask file path, or None                             |
| `label`    | `datasets.ClassLabel(names=...)` | class index, -1 = no label (segmentation-only sets)            |
| `age`      | `float32`                        | age in years, NaN = missing                                    |
| `sex`      | `string`                         | raw value from the source, None = missing                      |
| `site`     | `string`                         | anatomical site, raw value from the source, None = missing     |
| `group_id` | `string`                         | lesion id (or patient / image id when none): the split unit    |
| `source`   | `string`                         | which loader made the row ("ham10000", "isic2019", ...)        |
| `image_id` | `string`                         | image name without extension                                   |

Only file paths are stored, so a 25k-image ISIC 2019 set costs a few megabytes until images are read.

This module is not part of the remote code (it imports `datasets`); the modeling files never import it.
"""

import io
import logging
import math
import os
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from PIL import ImageOps

from .configuration_skinlesion import HAM10000_LABELS
from .image_processing_skinlesion import (
    SkinLesionImageProcessor,
    SkinLesionMetadataProcessor,
    load_image,
    to_binary_mask,
    to_rgb_array,
)

logger = logging.getLogger(__name__)

ISIC2019_LABELS = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
# HAM10000 `dx` codes as ISIC 2019 classes (ISIC 2019 re-uses the HAM10000 images with these names).
HAM10000_TO_ISIC2019 = {
    "akiec": "AK",
    "bcc": "BCC",
    "bkl": "BKL",
    "df": "DF",
    "mel": "MEL",
    "nv": "NV",
    "vasc": "VASC",
}
# ISIC 2017 `diagnosis` values as ISIC 2019 classes.
ISIC2017_TO_ISIC2019 = {"melanoma": "MEL", "nevus": "NV", "seborrheic keratosis": "BKL"}
LABEL_SETS = {"ham10000": HAM10000_LABELS, "isic2019": ISIC2019_LABELS}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIX = "_segmentation"
CLINIC_COLUMNS = ("image", "label", "age", "sex", "site", "group_id", "mask", "image_id")
SCHEMA_COLUMNS = ("image", "mask", "label", "age", "sex", "site", "group_id", "source", "image_id")
MISSING_STRINGS = {"", "nan", "none", "null", "na", "n/a"}
OnMissing = Literal["skip", "raise"]


# --------------------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------------------
def dataset_features(label_names: Sequence[str]) -> datasets.Features:
    """The features every loader returns, with `label_names` as the class names."""
    if not label_names:
        raise ValueError("`label_names` must hold at least one class name.")
    return datasets.Features(
        {
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "label": datasets.ClassLabel(names=list(label_names)),
            "age": datasets.Value("float32"),
            "sex": datasets.Value("string"),
            "site": datasets.Value("string"),
            "group_id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "image_id": datasets.Value("string"),
        }
    )


def label_names(dataset: datasets.Dataset) -> list[str]:
    """Class names of a dataset in the unified schema."""
    feature = dataset.features.get("label")
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(f"The dataset's `label` column must be a ClassLabel, got {feature!r}.")
    return list(feature.names)


def column_values(dataset: datasets.Dataset, column: str) -> list[Any]:
    """The values of one (non-image) column, honouring `select`/`shuffle` index mappings."""
    return dataset.select_columns([column]).to_dict()[column]


def _clean_string(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return None if text.lower() in MISSING_STRINGS else text


def _clean_age(value: Any) -> float:
    try:
        age = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return age


def _build(rows: dict[str, list], names: Sequence[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(rows, features=dataset_features(names))


def _empty_rows() -> dict[str, list]:
    return {column: [] for column in SCHEMA_COLUMNS}


def _index_files(root: Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> dict[str, Path]:
    """Every file under `root` with one of `extensions`, by name without extension (first found wins, sorted)."""
    extensions = tuple(e.lower() for e in extensions)
    found: dict[str, Path] = {}
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() in extensions and not name.startswith("."):
                found.setdefault(stem, Path(directory) / name)
    return found


def _check_dir(path: str | os.PathLike, argument: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"`{argument}` must be an existing folder, got {str(path)!r}.")
    return path


def _report_missing(names: list[str], what: str, source: str, on_missing: OnMissing) -> None:
    if not names:
        return
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    message = f"{source}: {len(names)} {what} not found: {shown}."
    if on_missing == "raise":
        raise ValueError(message + " Pass `on_missing='skip'` to drop these rows.")
    logger.warning(message + " These rows are skipped.")


def _check_on_missing(on_missing: str) -> None:
    if on_missing not in ("skip", "raise"):
        raise ValueError(f"`on_missing` must be 'skip' or 'raise', got {on_missing!r}.")


def _check_masks_option(masks: Any) -> None:
    if masks not in (True, False, "optional"):
        raise ValueError(f"`masks` must be True, False or 'optional', got {masks!r}.")


# --------------------------------------------------------------------------------------------------------------------
# Loaders for the official layouts
# --------------------------------------------------------------------------------------------------------------------
def load_ham10000(
    root: str | os.PathLike,
    masks: bool | Literal["optional"] = "optional",
    labels: Literal["ham10000", "isic2019"] = "ham10000",
    metadata_csv: str | os.PathLike | None = None,
    on_missing: OnMissing = "skip",
) -> datasets.Dataset:
    """HAM10000: `HAM10000_metadata.csv` plus image folders anywhere under `root` (`images/`,
    `HAM10000_images_part_1/`, `HAM10000_images_part_2/`, ...) plus optional `ISIC_*_segmentation.png` masks
    (`masks/`, `HAM10000_segmentations_lesion_tschandl/`, ...).

    Args:
        root: the dataset folder.
        masks: `True` pairs every image with its mask and leaves `mask` None where the mask file is missing (reported
            by `validate_files`); `"optional"` does the same without expecting masks; `False` ignores masks.
        labels: `"ham10000"` keeps the 7 `dx` codes, `"isic2019"` names them as ISIC 2019 classes (8 names, SCC
            unused) so HAM10000 and ISIC 2019 can be concatenated.
        metadata_csv: the metadata file (default: `HAM10000_metadata.csv` found under `root`).
        on_missing: rows whose image file is absent are dropped with a warning naming them (`"skip"`) or raise.

    `group_id` is the `lesion_id`: several images of one lesion always land in the same split.
    """
    root = _check_dir(root, "root")
    _check_masks_option(masks)
    _check_on_missing(on_missing)
    if labels not in LABEL_SETS:
        raise ValueError(f"`labels` must be one of {sorted(LABEL_SETS)}, got {labels!r}.")
    if metadata_csv is None:
        candidates = sorted(root.rglob("HAM10000_metadata.csv")) or sorted(root.rglob("HAM10000_metadata*"))
        if not candidates:
            raise ValueError(f"No HAM10000_metadata.csv under {root}; pass `metadata_csv`.")
        metadata_csv = candidates[0]
    table = pd.read_csv(metadata_csv, dtype={"lesion_id": str, "image_id": str, "dx": str})
    required = {"lesion_id", "image_id", "dx"}
    if not required <= set(table.columns):
        raise ValueError(
            f"{metadata_csv} must have the columns {sorted(required)} (plus age, sex, localization); it has "
            f"{list(table.columns)}."
        )
    unknown = sorted(set(table["dx"]) - set(HAM10000_LABELS))
    if unknown:
        raise ValueError(f"{metadata_csv} has unknown `dx` values {unknown}; expected {HAM10000_LABELS}.")
    files = _index_files(root)
    images = {stem: path for stem, path in files.items() if not stem.endswith(MASK_SUFFIX)}
    mask_files = {stem[: -len(MASK_SUFFIX)]: path for stem, path in files.items() if stem.endswith(MASK_SUFFIX)}
    if masks is True and not mask_files:
        raise ValueError(f"`masks=True` but no `*{MASK_SUFFIX}.png` files were found under {root}.")
    names = LABEL_SETS[labels]
    rows, missing = _empty_rows(), []
    for record in table.to_dict(orient="records"):
        image_id = str(record["image_id"]).strip()
        path = images.get(image_id)
        if path is None:
            missing.append(image_id)
            continue
        dx = record["dx"].strip()
        mask = mask_files.get(image_id) if masks else None
        rows["image"].append(str(path))
        rows["mask"].append(str(mask) if mask is not None else None)
        rows["label"].append(names.index(dx if labels == "ham10000" else HAM10000_TO_ISIC2019[dx]))
        rows["age"].append(_clean_age(record.get("age")))
        rows["sex"].append(_clean_string(record.get("sex")))
        rows["site"].append(_clean_string(record.get("localization")))
        rows["group_id"].append(_clean_string(record["lesion_id"]) or image_id)
        rows["source"].append("ham10000")
        rows["image_id"].append(image_id)
    _report_missing(missing, "images listed in the metadata", "HAM10000", on_missing)
    return _build(rows, names)


def load_isic2017(
    root: str | os.PathLike, masks: bool | Literal["optional"] = True, on_missing: OnMissing = "skip"
) -> datasets.Dataset:
    """The ISIC 2017 folder of `../shared/data`: `images/`, `masks/ISIC_*_segmentation.png` and `manifest.csv`.

    With `masks=True` (segmentation training) only the images the manifest declares as having a ground-truth mask
    are returned (456 in the shared copy); a declared but absent mask file leaves `mask` None, which `validate_files`
    reports. With `"optional"` or `False` every image is returned. Labels are ISIC 2019 classes (melanoma → MEL,
    nevus → NV, seborrheic keratosis → BKL; -1 where the diagnosis is unknown); age, sex and site come from the
    manifest. There are no lesion ids, so `group_id` is the image id.
    """
    root = _check_dir(root, "root")
    _check_masks_option(masks)
    _check_on_missing(on_missing)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise ValueError(f"No manifest.csv in {root}; expected the ISIC 2017 layout images/ + masks/ + manifest.csv.")
    table = pd.read_csv(manifest, dtype={"image_id": str})
    if "image_id" not in table.columns:
        raise ValueError(f"{manifest} must have an `image_id` column; it has {list(table.columns)}.")
    files = _index_files(root)
    rows, missing = _empty_rows(), []
    for record in table.to_dict(orient="records"):
        image_id = str(record["image_id"]).strip()
        declared = bool(record.get("has_isic2017_mask", 1) == 1)
        if masks is True and not declared:
            continue
        path = files.get(image_id)
        if path is None:
            missing.append(image_id)
            continue
        mask = files.get(image_id + MASK_SUFFIX) if masks else None
        diagnosis = (_clean_string(record.get("diagnosis")) or "").lower()
        label = ISIC2017_TO_ISIC2019.get(diagnosis)
        age = record.get("age_approx")
        if age is None or (isinstance(age, float) and math.isnan(age)):
            age = record.get("isic2019_age_approx")
        rows["image"].append(str(path))
        rows["mask"].append(str(mask) if mask is not None else None)
        rows["label"].append(ISIC2019_LABELS.index(label) if label else -1)
        rows["age"].append(_clean_age(age))
        rows["sex"].append(_clean_string(record.get("sex")) or _clean_string(record.get("isic2019_sex")))
        rows["site"].append(_clean_string(record.get("isic2019_anatom_site_general")))
        rows["group_id"].append(image_id)
        rows["source"].append("isic2017")
        rows["image_id"].append(image_id)
    _report_missing(missing, "images listed in the manifest", "ISIC 2017", on_missing)
    return _build(rows, ISIC2019_LABELS)


def load_isic2018_task1(
    root: str | os.PathLike, split: str | None = None, on_missing: OnMissing = "skip"
) -> datasets.Dataset:
    """ISIC 2018 Task 1 (segmentation): images in `*_Input/ISIC_*.jpg` folders, masks in
    `*_GroundTruth/ISIC_*_segmentation.png` folders, anywhere under `root`.

    `split` keeps only folders whose name contains it (`"Training"`, `"Validation"`, `"Test"`). Images without a
    mask keep `mask` None (`validate_files` reports them). The set has no labels: `label` is -1 with the ISIC 2019
    class names, so it concatenates with `load_isic2017` and `load_isic2019`. `on_missing` only applies when a
    mask has no image.
    """
    root = _check_dir(root, "root")
    _check_on_missing(on_missing)
    folders = sorted(p for p in root.rglob("*") if p.is_dir())
    if root.name.endswith(("_Input", "_GroundTruth")):
        folders.insert(0, root)
    if split is not None:
        folders = [p for p in folders if split.lower() in p.name.lower()]
    inputs = [p for p in folders if p.name.endswith("_Input")]
    truths = [p for p in folders if p.name.endswith("_GroundTruth")]
    if not inputs:
        raise ValueError(
            f"No `*_Input` image folder under {root}"
            + (f" matching split={split!r}" if split else "")
            + "; expected the ISIC 2018 Task 1 layout `..._Input/ISIC_*.jpg` + "
            "`..._GroundTruth/ISIC_*_segmentation.png`."
        )
    images: dict[str, Path] = {}
    for folder in inputs:
        for stem, path in _index_files(folder).items():
            if stem.startswith("ISIC_") and not stem.endswith(MASK_SUFFIX):
                images.setdefault(stem, path)
    mask_files: dict[str, Path] = {}
    for folder in truths:
        for stem, path in _index_files(folder, (".png",)).items():
            if stem.endswith(MASK_SUFFIX):
                mask_files.setdefault(stem[: -len(MASK_SUFFIX)], path)
    rows = _empty_rows()
    for image_id in sorted(images):
        mask = mask_files.get(image_id)
        rows["image"].append(str(images[image_id]))
        rows["mask"].append(str(mask) if mask is not None else None)
        rows["label"].append(-1)
        rows["age"].append(float("nan"))
        rows["sex"].append(None)
        rows["site"].append(None)
        rows["group_id"].append(image_id)
        rows["source"].append("isic2018_task1")
        rows["image_id"].append(image_id)
    _report_missing(sorted(set(mask_files) - set(images)), "images of ground-truth masks", "ISIC 2018", on_missing)
    return _build(rows, ISIC2019_LABELS)


def _canonical_isic_id(name: str) -> str:
    return name[: -len("_downsampled")] if name.endswith("_downsampled") else name


def load_isic2019(
    root: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    on_missing: OnMissing = "skip",
    keep_unknown: bool = False,
) -> datasets.Dataset:
    """ISIC 2019 Task 1: `ISIC_2019_Training_Input/` plus `ISIC_2019_Training_GroundTruth.csv` (one-hot
    MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK) and `ISIC_2019_Training_Metadata.csv` (age_approx,
    anatom_site_general, lesion_id, sex).

    Names with the `_downsampled` suffix (images the challenge re-saved smaller) are matched with or without the
    suffix on either side. UNK rows are dropped unless `keep_unknown` (then `label` is -1). `group_id` is the
    `lesion_id`, or the image id without the suffix when the lesion id is missing. Rows whose image is absent
    follow `on_missing` (the warning names them).
    """
    root = _check_dir(root, "root")
    _check_on_missing(on_missing)
    truth_csv = root / "ISIC_2019_Training_GroundTruth.csv"
    meta_csv = root / "ISIC_2019_Training_Metadata.csv"
    for path in (truth_csv, meta_csv):
        if not path.is_file():
            raise ValueError(f"{path.name} not found in {root}; expected the ISIC 2019 layout.")
    if images_dir is None:
        images_dir = root / "ISIC_2019_Training_Input"
    images_dir = _check_dir(images_dir, "images_dir")
    truth = pd.read_csv(truth_csv, dtype={"image": str})
    meta = pd.read_csv(meta_csv, dtype={"image": str, "lesion_id": str, "sex": str, "anatom_site_general": str})
    missing_columns = [c for c in ["image", *ISIC2019_LABELS] if c not in truth.columns]
    if missing_columns:
        raise ValueError(f"{truth_csv} lacks the columns {missing_columns}; it has {list(truth.columns)}.")
    if "image" not in meta.columns:
        raise ValueError(f"{meta_csv} must have an `image` column; it has {list(meta.columns)}.")
    meta_by_id = {_canonical_isic_id(str(r["image"])): r for r in meta.to_dict(orient="records")}
    files = {}
    for stem, path in _index_files(images_dir).items():
        files.setdefault(_canonical_isic_id(stem), path)
    one_hot = truth[ISIC2019_LABELS].to_numpy(dtype=np.float32)
    rows, missing = _empty_rows(), []
    for name, scores in zip(truth["image"].astype(str), one_hot):
        canonical = _canonical_isic_id(name.strip())
        if scores.max() <= 0 and not keep_unknown:
            continue
        path = files.get(canonical)
        if path is None:
            missing.append(name)
            continue
        record = meta_by_id.get(canonical, {})
        rows["image"].append(str(path))
        rows["mask"].append(None)
        rows["label"].append(int(scores.argmax()) if scores.max() > 0 else -1)
        rows["age"].append(_clean_age(record.get("age_approx")))
        rows["sex"].append(_clean_string(record.get("sex")))
        rows["site"].append(_clean_string(record.get("anatom_site_general")))
        rows["group_id"].append(_clean_string(record.get("lesion_id")) or canonical)
        rows["source"].append("isic2019")
        rows["image_id"].append(name.strip())
    _report_missing(missing, "images listed in the ground truth", "ISIC 2019", on_missing)
    return _build(rows, ISIC2019_LABELS)


# --------------------------------------------------------------------------------------------------------------------
# Clinic layout and Hub datasets
# --------------------------------------------------------------------------------------------------------------------
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


LOADERS: dict[str, Callable[..., datasets.Dataset]] = {
    "ham10000": load_ham10000,
    "isic2017": load_isic2017,
    "isic2018_task1": load_isic2018_task1,
    "isic2019": load_isic2019,
}


def load_source(name: str, root: str | os.PathLike, **kwargs: Any) -> datasets.Dataset:
    """Load one of the official layouts by name (`ham10000`, `isic2017`, `isic2018_task1`, `isic2019`);
    `kwargs` go to its loader."""
    if name not in LOADERS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(LOADERS)} (or use load_clinic/load_hub).")
    return LOADERS[name](root, **kwargs)


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


# --------------------------------------------------------------------------------------------------------------------
# Grouped, stratified splits
# --------------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------------
# File checks
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class FileValidationSummary:
    """What `validate_files` found. Each problem is `(image_id, file, reason)`."""

    num_checked: int = 0
    num_kept: int = 0
    bad_images: list[tuple[str, str, str]] = field(default_factory=list)
    bad_masks: list[tuple[str, str, str]] = field(default_factory=list)
    missing_masks: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def problems(self) -> list[tuple[str, str, str]]:
        return self.bad_images + self.bad_masks + self.missing_masks

    @property
    def bad_names(self) -> list[str]:
        return [image_id for image_id, _, _ in self.problems]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_checked": self.num_checked,
            "num_kept": self.num_kept,
            "bad_images": [list(p) for p in self.bad_images],
            "bad_masks": [list(p) for p in self.bad_masks],
            "missing_masks": [list(p) for p in self.missing_masks],
        }

    def __str__(self) -> str:
        lines = [f"Checked {self.num_checked} images: {len(self.problems)} with problems, {self.num_kept} kept."]
        for title, items in (
            ("Unreadable images", self.bad_images),
            ("Unreadable masks", self.bad_masks),
            ("Images without a mask", self.missing_masks),
        ):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  {image_id}: {reason}" for image_id, _, reason in items[:50])
                if len(items) > 50:
                    lines.append(f"  ... and {len(items) - 50} more")
        return "\n".join(lines)


def _raw_file(value: Any) -> Any:
    """A path, bytes or PIL image from an undecoded `datasets.Image` value, a path string or a PIL image."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return io.BytesIO(value["bytes"])
        return value.get("path")
    return value


def _file_name(value: Any, fallback: str) -> str:
    if isinstance(value, dict):
        return value.get("path") or fallback
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return fallback


def check_image_file(value: Any, name: str, full_decode: bool = True) -> str | None:
    """`None` if the image opens (and, with `full_decode`, decodes to the end), else the reason, naming the file."""
    raw = _raw_file(value)
    if raw is None:
        return f"{name}: no file"
    if isinstance(raw, PILImage.Image):
        return None
    try:
        with PILImage.open(raw) as image:
            if full_decode:
                # Decode JPEGs at reduced scale: the whole data stream is still read (so truncation shows), 8x faster.
                image.draft("RGB", (max(image.width // 8, 1), max(image.height // 8, 1)))
                image.load()
    except FileNotFoundError:
        return f"{name}: file not found"
    except (PILImage.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        kind = "not an image" if isinstance(error, PILImage.UnidentifiedImageError) else "unreadable or truncated"
        return f"{name}: {kind} ({error})"
    return None


def validate_files(
    dataset: datasets.Dataset,
    on_error: Literal["skip", "raise"] = "skip",
    check_masks: bool = True,
    require_masks: bool | None = None,
    full_decode: bool = True,
    num_threads: int | None = None,
) -> tuple[datasets.Dataset, FileValidationSummary]:
    """Open every image (and mask) of `dataset` and report missing, unreadable, truncated and non-image files, and
    images without a mask, by name.

    Args:
        on_error: `"skip"` returns the dataset without the bad rows and logs the summary; `"raise"` raises a
            `ValueError` holding the summary.
        check_masks: also open the mask files.
        require_masks: an image without a mask is a problem (default: `check_masks`). Use `False` for classifier
            data where masks are optional.
        full_decode: decode every file to the end (catches truncation); `False` only reads the headers.
        num_threads: parallel readers (default: the number of CPUs, at most 8).

    Returns: `(dataset_without_bad_rows, summary)`.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"`on_error` must be 'skip' or 'raise', got {on_error!r}.")
    require_masks = check_masks if require_masks is None else require_masks
    raw = dataset.select_columns(["image", "mask", "image_id"])
    raw = raw.cast_column("image", datasets.Image(decode=False)).cast_column("mask", datasets.Image(decode=False))
    rows = raw.to_list()

    def check(row: dict[str, Any]) -> tuple[str | None, str | None, bool]:
        image_error = check_image_file(row["image"], _file_name(row["image"], row["image_id"]), full_decode)
        mask_error, no_mask = None, False
        if row["mask"] is None:
            no_mask = require_masks
        elif check_masks:
            mask_error = check_image_file(row["mask"], _file_name(row["mask"], row["image_id"] + " mask"), full_decode)
        return image_error, mask_error, no_mask

    workers = num_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(check, rows, chunksize=64))
    summary = FileValidationSummary(num_checked=len(rows))
    keep = []
    for index, (row, (image_error, mask_error, no_mask)) in enumerate(zip(rows, results)):
        image_file = _file_name(row["image"], row["image_id"])
        if image_error:
            summary.bad_images.append((row["image_id"], image_file, image_error))
        if mask_error:
            summary.bad_masks.append((row["image_id"], _file_name(row["mask"], ""), mask_error))
        if no_mask:
            summary.missing_masks.append((row["image_id"], image_file, f"{image_file}: no mask"))
        if not (image_error or mask_error or no_mask):
            keep.append(index)
    summary.num_kept = len(keep)
    if summary.problems:
        if on_error == "raise":
            raise ValueError(f"Bad files in the dataset (pass on_error='skip' to drop them):\n{summary}")
        logger.warning("Skipping bad files:\n%s", summary)
    return (dataset.select(keep) if len(keep) < len(rows) else dataset), summary


# --------------------------------------------------------------------------------------------------------------------
# Joint augmentation and model inputs
# --------------------------------------------------------------------------------------------------------------------
def _decode(value: Any, name: str, draft_size: tuple[int, int] | None = None) -> PILImage.Image:
    """Open an image value; with `draft_size` (width, height) a JPEG is decoded at the smallest 1/2, 1/4 or 1/8
    scale that still covers it (several times faster for large images). Errors name the file."""
    raw = _raw_file(value)
    if draft_size is not None and not isinstance(raw, PILImage.Image):
        try:
            with PILImage.open(raw) as image:
                image.draft("RGB", draft_size)
                image.load()
                return ImageOps.exif_transpose(image)
        except Exception:  # noqa: BLE001 - load_image below re-raises it as a ValueError naming the file
            if hasattr(raw, "seek"):
                raw.seek(0)
    return load_image(raw, name=name)


class SkinLesionTransform:
    """Turns rows of the unified schema into model inputs, decoding images on the fly.

    Training (`train=True`) applies one random geometric transform to the image and its mask together (zoom into a
    random crop, small rotation and shift, horizontal/vertical flips, 90° rotations), then colour jitter to the image
    only. Evaluation only resizes, exactly as `SkinLesionImageProcessor.preprocess` does at inference.

    Randomness is drawn from `(seed, epoch, image_id)`, so augmentations do not depend on the worker, the process
    or on a resumed run; call `set_epoch` at each epoch.

    Rows whose image or mask cannot be read are dropped from the batch and logged by name (the epoch goes on). Use
    it as `dataset.with_transform(transform)` (cast `image`/`mask` to `datasets.Image(decode=False)` first, see
    `prepare_for_transform`, or a bad file raises inside `datasets` before the transform sees it), or through
    `SkinLesionCollator` / `build_dataloader`.

    Output (batched): `pixel_values` `(batch_size, 3, height, width)`; `lesion_mask` `(batch_size, 1, height,
    width)` 0/1 and `has_mask` `(batch_size,)` (all-zero mask where a row has none); `labels` `(batch_size,)` (-1 =
    no label); with a `metadata_processor` also `age`, `sex_ids`, `site_ids`; `image_id` (list of str); and
    `index` where the rows carry one.
    """

    def __init__(
        self,
        image_processor: SkinLesionImageProcessor,
        train: bool = False,
        metadata_processor: SkinLesionMetadataProcessor | None = None,
        seed: int = 0,
        zoom: tuple[float, float] = (1.0, 1.3),
        max_rotation: float = 20.0,
        max_shift: float = 0.1,
        flips: bool = True,
        rotate90: bool = True,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
    ):
        if not isinstance(image_processor, SkinLesionImageProcessor):
            raise ValueError(
                f"`image_processor` must be a SkinLesionImageProcessor, got {type(image_processor).__name__}."
            )
        if not (0 < zoom[0] <= zoom[1]):
            raise ValueError(f"`zoom` must be (low, high) with 0 < low <= high, got {zoom}.")
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0 <= value < 1:
                raise ValueError(f"`{name}` must lie in [0, 1), got {value}.")
        self.image_processor = image_processor
        self.train = train
        self.metadata_processor = metadata_processor
        self.seed = seed
        self.epoch = 0
        self.zoom = zoom
        self.max_rotation = max_rotation
        self.max_shift = max_shift
        self.flips = flips
        self.rotate90 = rotate90
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.size = (image_processor.size["height"], image_processor.size["width"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, image_id: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, zlib.crc32(image_id.encode())])

    def augment(
        self, image: torch.Tensor, mask: torch.Tensor | None, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Jointly augment an image `(3, height, width)` in [0, 1] at the output size and its mask
        `(1, height, width)` 0/1; returns both, the image still in [0, 1]."""
        height, width = image.shape[-2:]
        stacked = torch.cat([image, mask], dim=0) if mask is not None else image  # (3 or 4, h, w)
        zoom = rng.uniform(*self.zoom)
        angle = math.radians(rng.uniform(-self.max_rotation, self.max_rotation))
        shift = rng.uniform(-self.max_shift, self.max_shift, size=2)
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        # Output → input sampling grid in normalised coordinates: rotate, zoom in, shift.
        # (`F.affine_grid` computes the same grid, but is ~100x slower on CPU for one small image.)
        xs = (torch.arange(width, dtype=torch.float32) * 2 + 1) / width - 1  # pixel centres, align_corners=False
        ys = (torch.arange(height, dtype=torch.float32) * 2 + 1) / height - 1
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        grid_x = cos * x - sin * height / width * y + shift[0]
        grid_y = sin * width / height * x + cos * y + shift[1]
        grid = torch.stack([grid_x, grid_y], dim=-1)[None]  # (1, height, width, 2)
        stacked = F.grid_sample(stacked[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[
            0
        ]
        if self.flips and rng.random() < 0.5:
            stacked = stacked.flip(-1)
        if self.flips and rng.random() < 0.5:
            stacked = stacked.flip(-2)
        if self.rotate90:
            turns = int(rng.integers(4)) if height == width else 2 * int(rng.integers(2))
            stacked = torch.rot90(stacked, turns, dims=(-2, -1))
        image, mask = stacked[:3], (stacked[3:] > 0.5).float() if mask is not None else None
        # Colour jitter on the image only.
        image = image * rng.uniform(1 - self.brightness, 1 + self.brightness)
        gray = (image * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
        image = (image - gray.mean()) * rng.uniform(1 - self.contrast, 1 + self.contrast) + gray.mean()
        gray = (image * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
        image = gray + (image - gray) * rng.uniform(1 - self.saturation, 1 + self.saturation)
        return image.clamp(0, 1), mask

    def _train_example(self, image: Any, mask: Any, image_id: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        pixels = torch.from_numpy(np.ascontiguousarray(to_rgb_array(image))).permute(2, 0, 1)  # (h, w, 3) -> (3, h, w)
        pixels = F.interpolate(pixels[None], size=self.size, mode="bilinear", antialias=True, align_corners=False)[0]
        mask_tensor = None
        if mask is not None:
            binary = torch.from_numpy(to_binary_mask(mask, f"mask of {image_id}")).float()[None, None]
            mask_tensor = F.interpolate(binary, size=self.size, mode="nearest")[0]
        pixels, mask_tensor = self.augment(pixels.clamp(0, 1), mask_tensor, self._rng(image_id))
        mean = torch.tensor(self.image_processor.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_processor.image_std).view(3, 1, 1)
        if self.image_processor.do_normalize:
            pixels = (pixels - mean) / std
        return pixels, mask_tensor

    def example(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """One row → one example (tensors without the batch dimension). Raises `ValueError` naming a bad file."""
        image_id = str(row.get("image_id") or _file_name(row["image"], "image"))
        # Training decodes large JPEGs at reduced scale (still twice the output size); evaluation decodes them fully,
        # exactly as inference does.
        draft = (2 * self.size[1], 2 * self.size[0]) if self.train else None
        image = _decode(row["image"], _file_name(row["image"], image_id), draft)
        mask = row.get("mask")
        if mask is not None:
            mask = _decode(mask, _file_name(mask, image_id + " mask"))
            if mask.size != image.size:
                mask = mask.convert("L").resize(image.size, PILImage.NEAREST)
        if self.train:
            pixels, mask_tensor = self._train_example(image, mask, image_id)
        else:
            processed = self.image_processor.preprocess(image, masks=mask)
            pixels = processed["pixel_values"][0]
            mask_tensor = processed["lesion_mask"][0] if mask is not None else None
        has_mask = mask_tensor is not None
        return {
            "pixel_values": pixels.float(),
            "lesion_mask": mask_tensor if has_mask else torch.zeros(1, *pixels.shape[-2:]),
            "has_mask": has_mask,
            "labels": int(row.get("label", -1) if row.get("label") is not None else -1),
            "image_id": image_id,
        }

    def __call__(self, batch: Mapping[str, list]) -> dict[str, Any]:
        """A batch (dict of lists, as `with_transform` passes it) → model inputs for the rows that could be read."""
        size = len(next(iter(batch.values()))) if batch else 0
        examples, rows, dropped = [], [], []
        for i in range(size):
            row = {key: values[i] for key, values in batch.items()}
            try:
                examples.append(self.example(row))
                rows.append(row)
            except ValueError as error:
                name = str(row.get("image_id") or _file_name(row.get("image"), f"row {i}"))
                logger.warning("Skipping %s: %s", name, error)
                dropped.append(name)
        self.last_dropped = dropped
        height, width = self.size
        output: dict[str, Any] = {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples])
            if examples
            else torch.zeros(0, 3, height, width),
            "lesion_mask": torch.stack([e["lesion_mask"] for e in examples])
            if examples
            else torch.zeros(0, 1, height, width),
            "has_mask": torch.tensor([e["has_mask"] for e in examples], dtype=torch.bool),
            "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),
            "image_id": [e["image_id"] for e in examples],
        }
        if self.metadata_processor is not None:
            records = [{"age": row.get("age"), "sex": row.get("sex"), "site": row.get("site")} for row in rows]
            if records:
                output.update(self.metadata_processor(records))
            else:
                output.update(age=torch.zeros(0), sex_ids=torch.zeros(0, dtype=torch.long))
                output["site_ids"] = torch.zeros(0, dtype=torch.long)
        if "index" in batch:
            output["index"] = torch.tensor([int(row["index"]) for row in rows], dtype=torch.long)
        return output


def prepare_for_transform(dataset: datasets.Dataset) -> datasets.Dataset:
    """Cast `image` and `mask` to undecoded `datasets.Image` features, so the transform (not `datasets`) opens the
    files and can skip a bad one."""
    for column in ("image", "mask"):
        if column in dataset.column_names and isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


class SkinLesionRows(torch.utils.data.Dataset):
    """A map-style torch dataset over the undecoded rows of a `datasets.Dataset`, each with its `index`."""

    def __init__(self, dataset: datasets.Dataset):
        columns = [c for c in SCHEMA_COLUMNS if c in dataset.column_names]
        self.dataset = prepare_for_transform(dataset.select_columns(columns))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[int(index)], "index": int(index)}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        batch = self.dataset[[int(i) for i in indices]]
        return [{**{k: v[j] for k, v in batch.items()}, "index": int(i)} for j, i in enumerate(indices)]


class SkinLesionCollator:
    """DataLoader `collate_fn`: rows → `SkinLesionTransform` batch, plus `dropped` (names of rows that could not be
    read). A batch can come out empty (`pixel_values` with batch size 0) when every row was bad."""

    def __init__(self, transform: SkinLesionTransform):
        self.transform = transform

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = {key: [row.get(key) for row in rows] for key in rows[0]} if rows else {}
        output = self.transform(batch)
        output["dropped"] = list(self.transform.last_dropped)
        return output


def build_dataloader(
    dataset: datasets.Dataset,
    transform: SkinLesionTransform,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader that decodes and transforms rows lazily and never crashes on a bad file. The generator is
    seeded, so the order does not depend on the global RNG (and a resumed run sees the same batches)."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    if len(dataset) == 0:
        raise ValueError("`dataset` is empty; nothing to load.")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        SkinLesionRows(dataset),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=SkinLesionCollator(transform),
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,
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


__all__ = [
    "HAM10000_LABELS",
    "ISIC2019_LABELS",
    "LOADERS",
    "SCHEMA_COLUMNS",
    "FileValidationSummary",
    "SkinLesionCollator",
    "SkinLesionRows",
    "SkinLesionTransform",
    "balanced_class_weights",
    "build_dataloader",
    "check_image_file",
    "check_no_group_leak",
    "class_counts",
    "column_values",
    "concatenate_sources",
    "dataset_features",
    "grouped_split",
    "label_names",
    "load_clinic",
    "load_ham10000",
    "load_hub",
    "load_isic2017",
    "load_isic2018_task1",
    "load_isic2019",
    "load_source",
    "map_columns",
    "prepare_for_transform",
    "validate_files",
]
