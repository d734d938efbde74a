"""Loaders for the ISIC challenge and HAM10000 layouts, as downloaded.

Where each layout comes from (folder and file names as the official archives unpack):

- HAM10000 (Harvard Dataverse doi:10.7910/DVN/DBW86T): `HAM10000_metadata.csv`, `HAM10000_images_part_1/`,
  `HAM10000_images_part_2/`, masks `HAM10000_segmentations_lesion_tschandl/ISIC_*_segmentation.png`.
- ISIC 2016 Task 1 (challenge.isic-archive.com/landing/2016/37, isic-challenge-data.s3.amazonaws.com/2016/):
  `ISBI2016_ISIC_Part1_{Training,Test}_Data/ISIC_*.jpg` and `ISBI2016_ISIC_Part1_{Training,Test}_GroundTruth/
  ISIC_*_Segmentation.png` (capital S).
- ISIC 2017 Task 1 (challenge.isic-archive.com/landing/2017/42, .../2017/): `ISIC-2017_{Training,Validation,Test_v2}
  _Data/` holding `ISIC_*.jpg`, the Task 2 `ISIC_*_superpixels.png` (ignored) and, in later archives,
  `ISIC-2017_{split}_Data_metadata.csv` (`image_id,age_approximate,sex`, "unknown" = missing);
  `ISIC-2017_{split}_Part1_GroundTruth/ISIC_*_segmentation.png`; Part 3 labels
  `ISIC-2017_{split}_Part3_GroundTruth.csv` (`image_id,melanoma,seborrheic_keratosis`).
- ISIC 2018 Task 1 (challenge.isic-archive.com/data/#2018): `ISIC2018_Task1-2_{Training,Validation,Test}_Input/
  ISIC_*.jpg` and `ISIC2018_Task1_{Training,Validation,Test}_GroundTruth/ISIC_*_segmentation.png`.
- ISIC 2019 (challenge.isic-archive.com/data/#2019): `ISIC_2019_Training_Input/`,
  `ISIC_2019_Training_GroundTruth.csv`, `ISIC_2019_Training_Metadata.csv`.

Archives that unpack one folder inside another of the same name are read too: folders are found anywhere under
`root`. In the ISIC Task 1 folders the mask suffix is matched without regard to case (2016 spells it `_Segmentation`).
"""

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd

from .schema import (
    HAM10000_LABELS,
    HAM10000_TO_ISIC2019,
    ISIC2017_TO_ISIC2019,
    ISIC2019_LABELS,
    MASK_SUFFIX,
    Masks,
    OnMissing,
    _add_row,
    _build,
    _check_dir,
    _check_loader_arguments,
    _clean_string,
    _empty_rows,
    _index_files,
    _report_missing,
    check_label_set,
    isic2019_class_index,
)

logger = logging.getLogger(__name__)
ISIC2017_IMAGES = re.compile(r"^ISIC-2017_(Training|Validation|Test_v2)_Data$")
ISIC2017_MASKS = re.compile(r"^ISIC-2017_(Training|Validation|Test_v2)_Part1_GroundTruth$")
ISIC2017_METADATA = re.compile(r"^ISIC-2017_(Training|Validation|Test_v2)_Data_metadata\.csv$")
ISIC2017_PART3 = re.compile(r"^ISIC-2017_(Training|Validation|Test_v2)_Part3_GroundTruth\.csv$")
ISIC2016_IMAGES = re.compile(r"^ISBI2016_ISIC_Part1_(Training|Test)_Data$")
ISIC2016_MASKS = re.compile(r"^ISBI2016_ISIC_Part1_(Training|Test)_GroundTruth$")
ISIC2018_IMAGES = re.compile(r"^ISIC2018_Task1(-2)?_\w+_Input$")
ISIC2018_MASKS = re.compile(r"^ISIC2018_Task1_\w+_GroundTruth$")


# --------------------------------------------------------------------------------------------------------------------
# Image folder + ground-truth folder pairs (ISIC 2016, 2017, 2018 Task 1)
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class _Pair:
    image_id: str
    image: Path
    mask: Path | None


def _folders(root: Path, pattern: re.Pattern, split: str | None) -> list[Path]:
    """Folders under `root` (itself included) whose name matches `pattern` and contains `split`."""
    found = [root] if pattern.match(root.name) else []
    found += sorted(p for p in root.rglob("*") if p.is_dir() and pattern.match(p.name))
    if split is not None:
        found = [p for p in found if split.lower() in p.name.lower()]
    return found


def _is_mask(stem: str) -> bool:
    return stem.lower().endswith(MASK_SUFFIX)


def _paired_folders(
    root: Path,
    split: str | None,
    image_pattern: re.Pattern,
    mask_pattern: re.Pattern,
    source: str,
    layout: str,
    on_missing: OnMissing,
) -> list[_Pair]:
    """The `ISIC_*` images of the image folders, each with its `*_segmentation` mask from the ground-truth folders
    (None where absent; `validate_files` reports it). Superpixel files and CSVs beside the images are ignored; a
    mask without an image follows `on_missing`."""
    image_folders = _folders(root, image_pattern, split)
    if not image_folders:
        raise ValueError(
            f"No {source} image folder under {root}" + (f" matching split={split!r}" if split else "") + f"; "
            f"expected the official layout {layout}."
        )
    images: dict[str, Path] = {}
    for folder in image_folders:
        for stem, path in _index_files(folder).items():
            if stem.startswith("ISIC_") and not _is_mask(stem) and not stem.endswith("_superpixels"):
                images.setdefault(stem, path)
    masks: dict[str, Path] = {}
    for folder in _folders(root, mask_pattern, split):
        for stem, path in _index_files(folder, (".png",)).items():
            if _is_mask(stem):
                masks.setdefault(stem[: -len(MASK_SUFFIX)], path)
    _report_missing(sorted(set(masks) - set(images)), "images of ground-truth masks", source, on_missing)
    return [_Pair(image_id, images[image_id], masks.get(image_id)) for image_id in sorted(images)]


def _segmentation_set(pairs: list[_Pair], masks: Masks, source: str, labels: str) -> datasets.Dataset:
    """Rows without labels (-1, under the class names of `labels`) and without metadata."""
    rows = _empty_rows()
    for pair in pairs:
        _add_row(rows, pair.image, pair.mask if masks else None, pair.image_id, source)
    return _build(rows, check_label_set(labels))


def load_isic2016_task1(
    root: str | os.PathLike,
    split: str | None = None,
    masks: Masks = True,
    labels: str = "isic2019",
    on_missing: OnMissing = "skip",
) -> datasets.Dataset:
    """ISIC 2016 Task 1 (lesion segmentation) as downloaded: `ISBI2016_ISIC_Part1_Training_Data/`,
    `ISBI2016_ISIC_Part1_Training_GroundTruth/ISIC_*_Segmentation.png` and the `Test` pair, anywhere under `root`.

    `split` keeps the folders whose name contains it (`"Training"`, `"Test"`); default both. Images without a mask
    keep `mask` None (`masks=False` drops every mask). No labels: `label` is -1 under the class names of `labels`
    (`"isic2019"` or `"ham10000"`), so the set concatenates with the other loaders.
    """
    root = _check_loader_arguments(root, masks, on_missing)
    layout = "ISBI2016_ISIC_Part1_{Training,Test}_Data/ + ISBI2016_ISIC_Part1_{Training,Test}_GroundTruth/"
    pairs = _paired_folders(root, split, ISIC2016_IMAGES, ISIC2016_MASKS, "ISIC 2016", layout, on_missing)
    return _segmentation_set(pairs, masks, "isic2016_task1", labels)


def load_isic2018_task1(
    root: str | os.PathLike,
    split: str | None = None,
    on_missing: OnMissing = "skip",
    masks: Masks = True,
    labels: str = "isic2019",
) -> datasets.Dataset:
    """ISIC 2018 Task 1 (segmentation): images in `ISIC2018_Task1-2_{Training,Validation,Test}_Input/ISIC_*.jpg`,
    masks in `ISIC2018_Task1_{...}_GroundTruth/ISIC_*_segmentation.png`, anywhere under `root`. Other `*_Input` /
    `*_GroundTruth` folders are read only when no Task 1 folder is there (so Task 3 images never mix in).

    `split` keeps only folders whose name contains it (`"Training"`, `"Validation"`, `"Test"`). Images without a
    mask keep `mask` None (`validate_files` reports them). The set has no labels: `label` is -1 under the class
    names of `labels`, so it concatenates with `load_isic2017` and `load_isic2019`. `on_missing` only applies when a
    mask has no image.
    """
    root = _check_loader_arguments(root, masks, on_missing)
    # Task 1 folders when there are any: a root that also holds ISIC2018_Task3_Training_Input must not mix it in.
    task1 = bool(_folders(root, ISIC2018_IMAGES, None))
    image_pattern = ISIC2018_IMAGES if task1 else re.compile(r"_Input$")
    mask_pattern = ISIC2018_MASKS if task1 else re.compile(r"_GroundTruth$")
    layout = "`..._Input/ISIC_*.jpg` + `..._GroundTruth/ISIC_*_segmentation.png`"
    pairs = _paired_folders(root, split, image_pattern, mask_pattern, "ISIC 2018", layout, on_missing)
    return _segmentation_set(pairs, masks, "isic2018_task1", labels)


# --------------------------------------------------------------------------------------------------------------------
# ISIC 2017
# --------------------------------------------------------------------------------------------------------------------
def _csv_records(root: Path, pattern: re.Pattern, split: str | None) -> dict[str, dict[str, Any]]:
    """Rows by `image_id` of every CSV under `root` whose name matches `pattern` (and contains `split`)."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*.csv") if pattern.match(p.name)):
        if split is not None and split.lower() not in path.name.lower():
            continue
        table = pd.read_csv(path, dtype={"image_id": str})
        if "image_id" not in table.columns:
            raise ValueError(f"{path} must have an `image_id` column; it has {list(table.columns)}.")
        for record in table.to_dict(orient="records"):
            records.setdefault(str(record["image_id"]).strip(), record)
    return records


def _part3_class(record: dict[str, Any] | None) -> str | None:
    """ISIC 2017 Part 3 one-vs-rest columns as an ISIC 2019 class: melanoma, seborrheic keratosis, else nevus."""
    if record is None:
        return None
    if float(record.get("melanoma", 0)) >= 0.5:
        return "MEL"
    if float(record.get("seborrheic_keratosis", 0)) >= 0.5:
        return "BKL"
    return "NV"


def _load_isic2017_official(
    root: Path, masks: Masks, split: str | None, labels: str, on_missing: OnMissing
) -> datasets.Dataset:
    layout = (
        "ISIC-2017_{Training,Validation,Test_v2}_Data/ + ISIC-2017_{...}_Part1_GroundTruth/ (or the shared copy's "
        "images/ + masks/ + manifest.csv)"
    )
    pairs = _paired_folders(root, split, ISIC2017_IMAGES, ISIC2017_MASKS, "ISIC 2017", layout, on_missing)
    metadata = _csv_records(root, ISIC2017_METADATA, split)
    part3 = _csv_records(root, ISIC2017_PART3, split)
    rows = _empty_rows()
    for pair in pairs:
        record = metadata.get(pair.image_id, {})
        label = isic2019_class_index(_part3_class(part3.get(pair.image_id)), labels)
        _add_row(
            rows,
            pair.image,
            pair.mask if masks else None,
            pair.image_id,
            "isic2017",
            label=label,
            age=record.get("age_approximate"),
            sex=record.get("sex"),
        )
    return _build(rows, check_label_set(labels))


def load_isic2017(
    root: str | os.PathLike,
    masks: Masks = True,
    on_missing: OnMissing = "skip",
    split: str | None = None,
    labels: str = "isic2019",
) -> datasets.Dataset:
    """ISIC 2017 in either layout:

    - as downloaded: `ISIC-2017_{Training,Validation,Test_v2}_Data/` with `ISIC-2017_{...}_Part1_GroundTruth/`
      masks; age and sex from `ISIC-2017_{...}_Data_metadata.csv` where the download has it (else missing), labels
      from `ISIC-2017_{...}_Part3_GroundTruth.csv` where present (melanoma → MEL, seborrheic keratosis → BKL, the
      rest → NV; -1 without the CSV). `split` keeps folders and CSVs whose name contains it (`"Training"`,
      `"Validation"`, `"Test"`). Every image is returned; one without a mask keeps `mask` None.
    - the shared copy of `../shared/data`: `images/`, `masks/ISIC_*_segmentation.png` and `manifest.csv`. With
      `masks=True` only the images the manifest declares as having a ground-truth mask are returned (456); with
      `"optional"` or `False` every image. Labels from its `diagnosis` column, age, sex and site from its columns.

    `labels="ham10000"` names the classes as HAM10000 `dx` codes (mel, nv, bkl) instead of ISIC 2019 classes.
    There are no lesion ids, so `group_id` is the image id.
    """
    root = _check_loader_arguments(root, masks, on_missing)
    names = check_label_set(labels)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        return _load_isic2017_official(root, masks, split, labels, on_missing)
    if split is not None:
        raise ValueError(f"{root} is the manifest.csv layout, which has no official splits; leave `split` unset.")
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
        diagnosis = (_clean_string(record.get("diagnosis")) or "").lower()
        age = record.get("age_approx")
        if age is None or (isinstance(age, float) and np.isnan(age)):
            age = record.get("isic2019_age_approx")
        _add_row(
            rows,
            path,
            files.get(image_id + MASK_SUFFIX) if masks else None,
            image_id,
            "isic2017",
            label=isic2019_class_index(ISIC2017_TO_ISIC2019.get(diagnosis), labels),
            age=age,
            sex=_clean_string(record.get("sex")) or _clean_string(record.get("isic2019_sex")),
            site=record.get("isic2019_anatom_site_general"),
        )
    _report_missing(missing, "images listed in the manifest", "ISIC 2017", on_missing)
    return _build(rows, names)


# --------------------------------------------------------------------------------------------------------------------
# HAM10000 and ISIC 2019 (classification)
# --------------------------------------------------------------------------------------------------------------------
def load_ham10000(
    root: str | os.PathLike,
    masks: Masks = "optional",
    labels: str = "ham10000",
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
    root = _check_loader_arguments(root, masks, on_missing)
    names = check_label_set(labels)
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
    rows, missing = _empty_rows(), []
    for record in table.to_dict(orient="records"):
        image_id = str(record["image_id"]).strip()
        path = images.get(image_id)
        if path is None:
            missing.append(image_id)
            continue
        dx = record["dx"].strip()
        mask = mask_files.get(image_id) if masks else None
        _add_row(
            rows,
            path,
            mask,
            image_id,
            "ham10000",
            label=names.index(dx if labels == "ham10000" else HAM10000_TO_ISIC2019[dx]),
            age=record.get("age"),
            sex=record.get("sex"),
            site=record.get("localization"),
            group_id=_clean_string(record["lesion_id"]),
        )
    _report_missing(missing, "images listed in the metadata", "HAM10000", on_missing)
    return _build(rows, names)


def _canonical_isic_id(name: str) -> str:
    return name[: -len("_downsampled")] if name.endswith("_downsampled") else name


def load_isic2019(
    root: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    on_missing: OnMissing = "skip",
    keep_unknown: bool = False,
    masks: Masks = False,
    labels: str = "isic2019",
) -> datasets.Dataset:
    """ISIC 2019 Task 1: `ISIC_2019_Training_Input/` plus `ISIC_2019_Training_GroundTruth.csv` (one-hot
    MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK) and `ISIC_2019_Training_Metadata.csv` (age_approx,
    anatom_site_general, lesion_id, sex).

    Names with the `_downsampled` suffix (images the challenge re-saved smaller) are matched with or without the
    suffix on either side. UNK rows are dropped unless `keep_unknown` (then `label` is -1). `group_id` is the
    `lesion_id`, or the image id without the suffix when the lesion id is missing. Rows whose image is absent
    follow `on_missing` (the warning names them). ISIC 2019 has no masks (`masks=True` is refused).
    `labels="ham10000"` names the classes as HAM10000 `dx` codes (MEL → mel, AK → akiec, ...); SCC, which HAM10000
    lacks, then has label -1 (the count is logged).
    """
    root = _check_loader_arguments(root, masks, on_missing)
    if masks is True:
        raise ValueError("ISIC 2019 has no lesion masks; load it with `masks=False` (or 'optional').")
    names = check_label_set(labels)
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
    rows, missing, unmapped = _empty_rows(), [], 0
    for name, scores in zip(truth["image"].astype(str), one_hot):
        canonical = _canonical_isic_id(name.strip())
        if scores.max() <= 0 and not keep_unknown:
            continue
        path = files.get(canonical)
        if path is None:
            missing.append(name)
            continue
        record = meta_by_id.get(canonical, {})
        label = isic2019_class_index(ISIC2019_LABELS[int(scores.argmax())] if scores.max() > 0 else None, labels)
        unmapped += int(label == -1 and scores.max() > 0)
        _add_row(
            rows,
            path,
            None,
            name.strip(),
            "isic2019",
            label=label,
            age=record.get("age_approx"),
            sex=record.get("sex"),
            site=record.get("anatom_site_general"),
            group_id=_clean_string(record.get("lesion_id")) or canonical,
        )
    _report_missing(missing, "images listed in the ground truth", "ISIC 2019", on_missing)
    if unmapped:
        logger.info("ISIC 2019: %d SCC images have no HAM10000 class; their label is -1.", unmapped)
    return _build(rows, names)
