"""The unified schema every loader returns, the label sets, and the small helpers the loaders share."""

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets

from ..configuration_skinlesion import HAM10000_LABELS

logger = logging.getLogger(__name__)

ISIC2019_LABELS = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
# PH2's three clinical diagnoses, in the order of its `Clinical Diagnosis` codes 0, 1, 2.
PH2_LABELS = ["common_nevus", "atypical_nevus", "melanoma"]
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
ISIC2019_TO_HAM10000 = {isic: ham for ham, isic in HAM10000_TO_ISIC2019.items()}
# ISIC 2017 `diagnosis` values as ISIC 2019 classes.
ISIC2017_TO_ISIC2019 = {"melanoma": "MEL", "nevus": "NV", "seborrheic keratosis": "BKL"}
LABEL_SETS = {"ham10000": HAM10000_LABELS, "isic2019": ISIC2019_LABELS}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIX = "_segmentation"
CLINIC_COLUMNS = ("image", "label", "age", "sex", "site", "group_id", "mask", "image_id")
SCHEMA_COLUMNS = ("image", "mask", "label", "age", "sex", "site", "group_id", "source", "image_id")
MISSING_STRINGS = {"", "nan", "none", "null", "na", "n/a"}
OnMissing = Literal["skip", "raise"]
Masks = bool | Literal["optional"]


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


def check_label_set(labels: str, allowed: Sequence[str] = tuple(LABEL_SETS)) -> list[str]:
    """The class names of the label set `labels`; a `ValueError` lists the valid ones."""
    if labels not in allowed:
        raise ValueError(f"`labels` must be one of {sorted(allowed)}, got {labels!r}.")
    return PH2_LABELS if labels == "ph2" else LABEL_SETS[labels]


def isic2019_class_index(name: str | None, labels: str) -> int:
    """Index of the ISIC 2019 class `name` (e.g. "MEL") in the label set `labels` ("isic2019" or "ham10000");
    -1 for None, and for SCC under "ham10000" (HAM10000 has no such class)."""
    if name is None:
        return -1
    if labels == "ham10000":
        return HAM10000_LABELS.index(ISIC2019_TO_HAM10000[name]) if name in ISIC2019_TO_HAM10000 else -1
    return ISIC2019_LABELS.index(name)


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


def _add_row(
    rows: dict[str, list],
    image: Path,
    mask: Path | None,
    image_id: str,
    source: str,
    label: int = -1,
    age: Any = None,
    sex: Any = None,
    site: Any = None,
    group_id: str | None = None,
) -> None:
    """Append one row of the unified schema (`group_id` defaults to the image id)."""
    rows["image"].append(str(image))
    rows["mask"].append(str(mask) if mask is not None else None)
    rows["label"].append(label)
    rows["age"].append(_clean_age(age))
    rows["sex"].append(_clean_string(sex))
    rows["site"].append(_clean_string(site))
    rows["group_id"].append(group_id or image_id)
    rows["source"].append(source)
    rows["image_id"].append(image_id)


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


def _check_loader_arguments(root: str | os.PathLike, masks: Any, on_missing: str) -> Path:
    """The checks every folder loader starts with; returns `root` as a Path."""
    _check_masks_option(masks)
    _check_on_missing(on_missing)
    return _check_dir(root, "root")
