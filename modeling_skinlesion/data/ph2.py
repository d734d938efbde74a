"""Loader for the PH2 dermoscopy database as downloaded (Mendonça et al., EMBC 2013; fc.up.pt/addi/ph2 database).

The archive unpacks to (one folder per case, BMP files)::

    PH2Dataset/
        PH2 Dataset images/
            IMD002/
                IMD002_Dermoscopic_Image/IMD002.bmp
                IMD002_lesion/IMD002_lesion.bmp        # lesion mask, 0/255
                IMD002_roi/IMD002_R1_Label4.bmp ...     # colour regions (not used)
        PH2_dataset.txt
        PH2_dataset.xlsx

`PH2_dataset.txt` is a `||`-separated table whose header names `Name`, `Histological Diagnosis` and
`Clinical Diagnosis` (0 = common nevus, 1 = atypical nevus, 2 = melanoma); `PH2_dataset.xlsx` holds the same table
below a legend, with one `X` in one of the columns `Common Nevus`, `Atypical Nevus`, `Melanoma`.
"""

import importlib.util
import os
import zipfile
from pathlib import Path

import datasets
import pandas as pd

from .schema import (
    PH2_LABELS,
    Masks,
    OnMissing,
    _add_row,
    _build,
    _check_loader_arguments,
    _empty_rows,
    _report_missing,
    check_label_set,
    isic2019_class_index,
)

PH2_IMAGES_FOLDER = "PH2 Dataset images"
# PH2's diagnoses as ISIC 2019 classes: both kinds of nevus are nevi.
PH2_TO_ISIC2019 = {"common_nevus": "NV", "atypical_nevus": "NV", "melanoma": "MEL"}
_XLSX_COLUMNS = {"Common Nevus": "common_nevus", "Atypical Nevus": "atypical_nevus", "Melanoma": "melanoma"}


def _read_txt(path: Path) -> dict[str, str]:
    """Case name → diagnosis from `PH2_dataset.txt` (cells between `||`; the criteria inside one cell use `|`)."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if "||" in line]
    if not lines:
        raise ValueError(f"{path} holds no `||`-separated table; expected the PH2_dataset.txt of the PH2 download.")
    header = [cell.strip() for cell in lines[0].split("||")]
    for column in ("Name", "Clinical Diagnosis"):
        if column not in header:
            raise ValueError(f"{path}: the table header has no {column!r} column; it has {[c for c in header if c]}.")
    name_at, diagnosis_at = header.index("Name"), header.index("Clinical Diagnosis")
    diagnoses = {}
    for number, line in enumerate(lines[1:], start=2):
        cells = [cell.strip() for cell in line.split("||")]
        if len(cells) <= diagnosis_at or not cells[name_at].startswith("IMD"):
            continue
        code = cells[diagnosis_at]
        if code not in ("0", "1", "2"):
            raise ValueError(
                f"{path} row {number} ({cells[name_at]}): `Clinical Diagnosis` is {code!r}, not 0, 1 or 2."
            )
        diagnoses[cells[name_at]] = PH2_LABELS[int(code)]
    return diagnoses


def _read_xlsx(path: Path) -> dict[str, str]:
    """Case name → diagnosis from `PH2_dataset.xlsx` (the header row is the one starting with `Image Name`)."""
    if importlib.util.find_spec("openpyxl") is None:
        raise ImportError(
            f"Reading {path.name} needs openpyxl: pip install openpyxl (or keep PH2_dataset.txt beside it)."
        )
    try:
        raw = pd.read_excel(path, header=None, dtype=str)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"Cannot read {path} as a spreadsheet: {error}") from error
    starts = [i for i, value in enumerate(raw[0].fillna("")) if value.strip() == "Image Name"]
    if not starts:
        raise ValueError(f"{path}: no header row starting with 'Image Name'; expected the PH2_dataset.xlsx of PH2.")
    table = raw.iloc[starts[0] + 1 :].set_axis([str(c).strip() for c in raw.iloc[starts[0]]], axis=1)
    absent = [column for column in ("Image Name", *_XLSX_COLUMNS) if column not in table.columns]
    if absent:
        raise ValueError(f"{path}: the table has no columns {absent}; it has {list(table.columns)}.")
    diagnoses = {}
    for record in table.to_dict(orient="records"):
        name = str(record["Image Name"] or "").strip()
        if not name.startswith("IMD"):
            continue
        marked = [label for column, label in _XLSX_COLUMNS.items() if str(record[column] or "").strip().upper() == "X"]
        if len(marked) != 1:
            raise ValueError(f"{path}: {name} has {len(marked)} of {list(_XLSX_COLUMNS)} marked with X; expected one.")
        diagnoses[name] = marked[0]
    return diagnoses


def _diagnoses(root: Path, table: str | os.PathLike | None) -> dict[str, str] | None:
    """The diagnosis table: `table` if given, else `PH2_dataset.txt` (or `.xlsx`) found under `root`; None if
    there is none (the rows are then unlabelled)."""
    if table is None:
        found = sorted(root.rglob("PH2_dataset.txt")) or sorted(root.rglob("PH2_dataset.xlsx"))
        if not found:
            return None
        table = found[0]
    table = Path(table)
    if not table.is_file():
        raise ValueError(f"`table` must be an existing PH2_dataset.txt or .xlsx file, got {str(table)!r}.")
    return _read_xlsx(table) if table.suffix.lower() in (".xlsx", ".xls") else _read_txt(table)


def _case_file(case: Path, folder: str, stem: str) -> Path | None:
    """`case/<folder>/<stem>.<image extension>`, whatever the extension's case (BMP in the download)."""
    directory = case / folder
    if not directory.is_dir():
        return None
    matches = sorted(p for p in directory.iterdir() if p.stem == stem and not p.name.startswith("."))
    return matches[0] if matches else None


def load_ph2(
    root: str | os.PathLike,
    masks: Masks = True,
    labels: str = "ham10000",
    table: str | os.PathLike | None = None,
    on_missing: OnMissing = "skip",
) -> datasets.Dataset:
    """PH2 as downloaded: `root` is the `PH2Dataset` folder or any folder above it (see the module docstring).

    Args:
        masks: `True` / `"optional"` pair each image with `IMDxxx_lesion.bmp` (None where absent; `validate_files`
            reports it with `masks=True`), `False` ignores the masks.
        labels: `"ham10000"` (common and atypical nevus → nv, melanoma → mel, so the HAM10000 model is evaluated
            directly), `"isic2019"` (NV, MEL) or `"ph2"` (common_nevus, atypical_nevus, melanoma).
        table: the diagnosis table; default `PH2_dataset.txt` under `root`, else `PH2_dataset.xlsx` (needs openpyxl).
            Without either, `label` is -1.
        on_missing: a case listed in the table whose dermoscopic image is absent is dropped with a warning naming it
            (`"skip"`), or raises.

    There is no age, sex or site; `group_id` is the case name (one image per lesion).
    """
    root = _check_loader_arguments(root, masks, on_missing)
    names = check_label_set(labels, ("ham10000", "isic2019", "ph2"))
    folders = [root] if root.name == PH2_IMAGES_FOLDER else sorted(root.rglob(PH2_IMAGES_FOLDER))
    if not folders:
        raise ValueError(
            f"No {PH2_IMAGES_FOLDER!r} folder under {root}; expected the PH2 layout "
            f"PH2Dataset/{PH2_IMAGES_FOLDER}/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp."
        )
    cases = {p.name: p for p in sorted(folders[0].iterdir()) if p.is_dir() and p.name.startswith("IMD")}
    diagnoses = _diagnoses(folders[0].parent if root.name == PH2_IMAGES_FOLDER else root, table)
    rows, missing = _empty_rows(), []
    for name in sorted(set(cases) | set(diagnoses or {})):
        image = _case_file(cases[name], f"{name}_Dermoscopic_Image", name) if name in cases else None
        if image is None:
            missing.append(name)
            continue
        diagnosis = diagnoses.get(name) if diagnoses is not None else None
        if diagnosis is None or labels == "ph2":
            label = names.index(diagnosis) if diagnosis is not None else -1
        else:
            label = isic2019_class_index(PH2_TO_ISIC2019[diagnosis], labels)
        mask = _case_file(cases[name], f"{name}_lesion", f"{name}_lesion") if masks else None
        _add_row(rows, image, mask, name, "ph2", label=label)
    _report_missing(missing, "dermoscopic images of listed cases", "PH2", on_missing)
    return _build(rows, names)
