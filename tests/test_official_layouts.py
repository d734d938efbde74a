"""Loaders on folders laid out exactly like the official downloads (ISIC 2016 / 2017 / 2018 Task 1, PH2), built from
real images of the shared data; expected values come from the shared copy's own files (manifest, masks, CSVs)."""

import logging
import math
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from conftest import DATA_ROOT
from PIL import Image

from modeling_skinlesion.data import (
    HAM10000_LABELS,
    ISIC2019_LABELS,
    LOADERS,
    PH2_LABELS,
    column_values,
    load_isic2016_task1,
    load_isic2017,
    load_isic2018_task1,
    load_ph2,
    load_source,
    prepare_for_transform,
    validate_files,
)

ISIC2017 = DATA_ROOT / "isic2017"
HAM = DATA_ROOT / "ham10000"
LOGGER = "modeling_skinlesion.data"


def _link(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source.resolve())
    return target


def _isic_image(image_id: str) -> Path:
    return ISIC2017 / "images" / f"{image_id}.jpg"


def _isic_mask(image_id: str) -> Path:
    return ISIC2017 / "masks" / f"{image_id}_segmentation.png"


def _paths(dataset: datasets.Dataset, column: str) -> dict[str, str | None]:
    rows = prepare_for_transform(dataset).select_columns(["image_id", column])
    return {row["image_id"]: (row[column] or {}).get("path") for row in rows}


def _same_mask(path: str, reference: Path) -> bool:
    return np.array_equal(np.asarray(Image.open(path).convert("L")) > 127, np.asarray(Image.open(reference)) > 127)


def _manifest() -> pd.DataFrame:
    return pd.read_csv(ISIC2017 / "manifest.csv").set_index("image_id")


# --------------------------------------------------------------------------------------------------------------------
# ISIC 2016 Task 1
# --------------------------------------------------------------------------------------------------------------------
def test_isic2016_task1_official_folders(data_root: Path, tmp_path: Path):
    training, test = ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"], ["ISIC_0000003", "ISIC_0000004"]
    for split, ids in (("Training", training), ("Test", test)):
        for image_id in ids:
            _link(_isic_image(image_id), tmp_path / f"ISBI2016_ISIC_Part1_{split}_Data" / f"{image_id}.jpg")
            if image_id != training[2]:  # this training image has no ground truth
                name = f"{image_id}_Segmentation.png"  # 2016 masks are spelled with a capital S
                _link(_isic_mask(image_id), tmp_path / f"ISBI2016_ISIC_Part1_{split}_GroundTruth" / name)

    everything = load_isic2016_task1(tmp_path)
    assert column_values(everything, "image_id") == training + test
    assert set(column_values(everything, "source")) == {"isic2016_task1"}
    assert set(column_values(everything, "label")) == {-1}
    masks = _paths(everything, "mask")
    assert masks[training[2]] is None
    for image_id in training[:2] + test:
        assert _same_mask(masks[image_id], _isic_mask(image_id))
    _, summary = validate_files(everything)
    assert summary.bad_names == [training[2]]

    assert column_values(load_isic2016_task1(tmp_path, split="Test"), "image_id") == test
    assert set(_paths(load_isic2016_task1(tmp_path, masks=False), "mask").values()) == {None}
    with pytest.raises(ValueError, match="ISBI2016_ISIC_Part1_"):
        load_isic2016_task1(tmp_path / "ISBI2016_ISIC_Part1_Test_GroundTruth")


# --------------------------------------------------------------------------------------------------------------------
# ISIC 2017 Task 1 (+ the optional metadata and Part 3 CSVs)
# --------------------------------------------------------------------------------------------------------------------
TRAINING_2017 = ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002", "ISIC_0000003"]
VALIDATION_2017 = ["ISIC_0000006", "ISIC_0000007", "ISIC_0000008"]
# A seborrheic keratosis of the official Part 3 CSV; the shared copy lacks its image, so another real one stands in.
KERATOSIS = "ISIC_0012090"


def _isic2017_download(root: Path) -> Path:
    manifest = _manifest()
    data, truth = root / "ISIC-2017_Training_Data", root / "ISIC-2017_Training_Part1_GroundTruth"
    for image_id, source in [(i, i) for i in TRAINING_2017] + [(KERATOSIS, "ISIC_0000004")]:
        _link(_isic_image(source), data / f"{image_id}.jpg")
        _link(_isic_mask(source), data / f"{image_id}_superpixels.png")  # Task 2 superpixels sit beside the images
        if image_id != TRAINING_2017[3]:  # no ground truth for this one
            _link(_isic_mask(source), truth / f"{image_id}_segmentation.png")
    ages = [manifest.loc[i, "age_approx"] for i in TRAINING_2017] + [float("nan")]
    sexes = [manifest.loc[i, "sex"] for i in TRAINING_2017] + [float("nan")]
    pd.DataFrame(
        {
            "image_id": TRAINING_2017 + [KERATOSIS],
            "age_approximate": ["unknown" if pd.isna(a) else int(a) for a in ages],
            "sex": ["unknown" if pd.isna(s) else s for s in sexes],
        }
    ).to_csv(data / "ISIC-2017_Training_Data_metadata.csv", index=False)
    part3 = pd.read_csv(ISIC2017 / "ISIC-2017_Training_Part3_GroundTruth.csv")
    part3[part3["image_id"].isin(TRAINING_2017 + [KERATOSIS])].to_csv(
        root / "ISIC-2017_Training_Part3_GroundTruth.csv", index=False
    )
    for image_id in VALIDATION_2017:
        _link(_isic_image(image_id), root / "ISIC-2017_Validation_Data" / f"{image_id}.jpg")
        _link(_isic_mask(image_id), root / "ISIC-2017_Validation_Part1_GroundTruth" / f"{image_id}_segmentation.png")
    return root


def test_isic2017_official_layout_with_metadata_and_labels(data_root: Path, tmp_path: Path):
    root = _isic2017_download(tmp_path)
    manifest = _manifest()
    training = load_isic2017(root, split="Training")
    ids = sorted(TRAINING_2017 + [KERATOSIS])
    assert column_values(training, "image_id") == ids  # no `_superpixels` rows
    assert training.features["label"].names == ISIC2019_LABELS
    expected = {i: {"melanoma": "MEL", "nevus": "NV"}[manifest.loc[i, "diagnosis"]] for i in TRAINING_2017}
    expected[KERATOSIS] = "BKL"
    assert [ISIC2019_LABELS[label] for label in column_values(training, "label")] == [expected[i] for i in ids]
    for image_id, age, sex in zip(ids, column_values(training, "age"), column_values(training, "sex")):
        if image_id == KERATOSIS:
            assert math.isnan(age) and sex == "unknown"
            continue
        reference_age, reference_sex = manifest.loc[image_id, "age_approx"], manifest.loc[image_id, "sex"]
        assert (math.isnan(age) and pd.isna(reference_age)) or age == reference_age
        assert sex == (reference_sex if isinstance(reference_sex, str) else "unknown")
    masks = _paths(training, "mask")
    assert masks[TRAINING_2017[3]] is None and _same_mask(masks["ISIC_0000002"], _isic_mask("ISIC_0000002"))
    assert training[0]["image"].size == Image.open(_isic_image(ids[0])).size

    as_ham = load_isic2017(root, split="Training", labels="ham10000")
    assert [HAM10000_LABELS[label] for label in column_values(as_ham, "label")] == [
        {"MEL": "mel", "NV": "nv", "BKL": "bkl"}[expected[i]] for i in ids
    ]
    # Validation comes without metadata or Part 3 CSVs: unlabelled, no age or sex.
    validation = load_isic2017(root, split="Validation")
    assert column_values(validation, "image_id") == VALIDATION_2017
    assert set(column_values(validation, "label")) == {-1} and set(column_values(validation, "sex")) == {None}
    assert len(load_isic2017(root)) == len(ids) + len(VALIDATION_2017)


def test_isic2017_official_layout_without_metadata_csv_nested_folder(data_root: Path, tmp_path: Path):
    root = _isic2017_download(tmp_path)
    (root / "ISIC-2017_Training_Data" / "ISIC-2017_Training_Data_metadata.csv").unlink()
    # Unzipped into a folder named after the archive: ISIC-2017_Training_Data/ISIC-2017_Training_Data/...
    outer = root / "ISIC-2017_Training_Data"
    outer.rename(root / "unzipped")
    outer.mkdir()
    (root / "unzipped").rename(outer / "ISIC-2017_Training_Data")
    training = load_isic2017(root, split="Training")
    assert len(training) == len(TRAINING_2017) + 1
    assert all(math.isnan(age) for age in column_values(training, "age"))
    assert set(column_values(training, "sex")) == {None}
    assert ISIC2019_LABELS[column_values(training, "label")[2]] == "MEL"  # labels still come from Part 3


def test_isic2017_official_layout_bad_and_missing_files(data_root: Path, tmp_path: Path, caplog):
    root = _isic2017_download(tmp_path)
    bad = root / "ISIC-2017_Validation_Data" / "ISIC_0000008.jpg"
    data = bad.read_bytes()
    bad.unlink()
    bad.write_bytes(data[: len(data) // 2])  # a truncated download
    _link(
        _isic_mask("ISIC_0000009"), root / "ISIC-2017_Validation_Part1_GroundTruth" / "ISIC_0000009_segmentation.png"
    )

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = load_isic2017(root)
    assert "ISIC_0000009" in caplog.text  # a mask without its image is named
    _, summary = validate_files(dataset)
    reasons = {image_id: reason for image_id, _, reason in summary.problems}
    assert set(reasons) == {"ISIC_0000008", TRAINING_2017[3]}
    assert "ISIC_0000008.jpg" in reasons["ISIC_0000008"] and "truncated" in reasons["ISIC_0000008"]
    assert "no mask" in reasons[TRAINING_2017[3]]
    with pytest.raises(ValueError, match="ISIC_0000009"):
        load_isic2017(root, on_missing="raise")
    with pytest.raises(ValueError, match="split='Test'"):
        load_isic2017(root, split="Test")
    with pytest.raises(ValueError, match="no official splits"):
        load_isic2017(ISIC2017, split="Training")


# --------------------------------------------------------------------------------------------------------------------
# ISIC 2018 Task 1
# --------------------------------------------------------------------------------------------------------------------
def test_isic2018_task1_layout(data_root: Path, tmp_path: Path):
    ids = sorted(p.stem for p in (ISIC2017 / "images").glob("*.jpg"))[:5]
    for split in ("Training", "Validation"):
        for image_id in ids if split == "Training" else ids[:2]:
            _link(_isic_image(image_id), tmp_path / f"ISIC2018_Task1-2_{split}_Input" / f"{image_id}.jpg")
    for image_id in ids[:4]:  # the fifth training image has no ground truth
        _link(_isic_mask(image_id), tmp_path / "ISIC2018_Task1_Training_GroundTruth" / f"{image_id}_segmentation.png")
    (tmp_path / "ISIC2018_Task1-2_Training_Input" / "LICENSE.txt").write_text("CC-0")
    # Task 3 images in the same root must not mix in.
    _link(_isic_image("ISIC_0000010"), tmp_path / "ISIC2018_Task3_Training_Input" / "ISIC_0000010.jpg")

    training = load_isic2018_task1(tmp_path, split="Training")
    assert column_values(training, "image_id") == ids
    assert set(column_values(training, "label")) == {-1} and training.features["label"].names == ISIC2019_LABELS
    masks = _paths(training, "mask")
    assert masks[ids[4]] is None and _same_mask(masks[ids[0]], _isic_mask(ids[0]))
    _, summary = validate_files(training)
    assert [p[0] for p in summary.missing_masks] == [ids[4]]
    assert len(load_isic2018_task1(tmp_path)) == 5  # both splits, same ids; no Task 3 image
    with pytest.raises(ValueError, match="_Input"):
        load_isic2018_task1(tmp_path, split="Test")


# --------------------------------------------------------------------------------------------------------------------
# PH2
# --------------------------------------------------------------------------------------------------------------------
PH2_HEADER = (
    "||   Name || Histological Diagnosis || Clinical Diagnosis || Asymmetry | Pigment Network | Dots/Globules | "
    "Streaks | Regression Areas | Blue-Whitish Veil ||           Colors ||"
)
PH2_CASES = {"IMD002": 0, "IMD003": 1, "IMD004": 2, "IMD010": 0}


def _ph2_row(name: str, code: int) -> str:
    histology = "Melanoma" if code == 2 else ""
    criteria = "         0 |               T |             A |       A |                A |                 A"
    return f"|| {name} || {histology:>22} || {code:>18} ||{criteria} ||     4 ||"


def _ph2_download(root: Path) -> tuple[Path, dict[str, str]]:
    """`root/PH2Dataset` as the PH2 archive unpacks, BMPs converted from real HAM10000 images and masks."""
    dataset = root / "PH2Dataset"
    ham_ids = sorted(p.stem for p in (HAM / "images").glob("*.jpg"))[:4]
    sources = dict(zip(PH2_CASES, ham_ids))
    for name, ham_id in sources.items():
        case = dataset / "PH2 Dataset images" / name
        (case / f"{name}_Dermoscopic_Image").mkdir(parents=True)
        Image.open(HAM / "images" / f"{ham_id}.jpg").convert("RGB").save(case / f"{name}_Dermoscopic_Image/{name}.bmp")
        if name != "IMD010":  # this case lacks its lesion mask
            (case / f"{name}_lesion").mkdir()
            mask = Image.open(HAM / "masks" / f"{ham_id}_segmentation.png").convert("L")
            mask.save(case / f"{name}_lesion" / f"{name}_lesion.bmp")
    (dataset / "PH2 Dataset images" / "IMD002" / "IMD002_roi").mkdir()
    Image.new("L", (200, 150)).save(dataset / "PH2 Dataset images/IMD002/IMD002_roi/IMD002_R1_Label4.bmp")
    rows = [_ph2_row(name, code) for name, code in {**PH2_CASES, "IMD099": 2}.items()]  # IMD099: listed, no folder
    (dataset / "PH2_dataset.txt").write_text("\n".join([PH2_HEADER, *rows, "", "Legends: ..."]) + "\n")
    return dataset, sources


def test_ph2_layout_labels_images_and_masks(data_root: Path, tmp_path: Path, caplog):
    dataset_root, sources = _ph2_download(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ph2 = load_ph2(tmp_path, labels="ph2")
    assert "IMD099" in caplog.text
    names = list(PH2_CASES)
    assert column_values(ph2, "image_id") == names and ph2.features["label"].names == PH2_LABELS
    assert column_values(ph2, "label") == list(PH2_CASES.values())
    assert set(column_values(ph2, "source")) == {"ph2"} and column_values(ph2, "group_id") == names
    for i, name in enumerate(names):
        expected = np.asarray(Image.open(HAM / "images" / f"{sources[name]}.jpg").convert("RGB"))
        assert np.array_equal(np.asarray(ph2[i]["image"].convert("RGB")), expected)
    masks = _paths(ph2, "mask")
    assert masks["IMD010"] is None
    assert _same_mask(masks["IMD004"], HAM / "masks" / f"{sources['IMD004']}_segmentation.png")

    as_ham = load_ph2(dataset_root)  # the PH2Dataset folder itself; HAM10000 names by default
    assert [HAM10000_LABELS[label] for label in column_values(as_ham, "label")] == ["nv", "nv", "mel", "nv"]
    as_isic = load_ph2(dataset_root / "PH2 Dataset images", labels="isic2019")
    assert [ISIC2019_LABELS[label] for label in column_values(as_isic, "label")] == ["NV", "NV", "MEL", "NV"]
    _, summary = validate_files(as_ham)
    assert summary.bad_names == ["IMD010"]
    with pytest.raises(ValueError, match="IMD099"):
        load_ph2(tmp_path, on_missing="raise")
    with pytest.raises(ValueError, match="`labels`"):
        load_ph2(tmp_path, labels="ph3")


def test_ph2_table_problems_are_named(data_root: Path, tmp_path: Path):
    dataset_root, _ = _ph2_download(tmp_path)
    table = dataset_root / "PH2_dataset.txt"
    table.write_text(table.read_text().replace(_ph2_row("IMD003", 1), _ph2_row("IMD003", 7)))
    with pytest.raises(ValueError, match=r"IMD003.*`Clinical Diagnosis` is '7'"):
        load_ph2(tmp_path)
    table.write_text(PH2_HEADER.replace("Clinical Diagnosis", "Diagnosis") + "\n")
    with pytest.raises(ValueError, match="no 'Clinical Diagnosis' column"):
        load_ph2(tmp_path)
    table.unlink()  # without the table the images are still read, unlabelled
    assert set(column_values(load_ph2(tmp_path), "label")) == {-1}
    with pytest.raises(ValueError, match="PH2 Dataset images"):
        load_ph2(tmp_path / "PH2Dataset" / "PH2 Dataset images" / "IMD002")


def test_ph2_spreadsheet(data_root: Path, tmp_path: Path):
    """`PH2_dataset.xlsx` (a legend, then a header row starting with `Image Name` and X marks) when there is no
    `.txt`; without openpyxl the error says how to install it."""
    dataset_root, _ = _ph2_download(tmp_path)
    (dataset_root / "PH2_dataset.txt").unlink()
    legend = [["Legends:"] + [None] * 4] + [[None] * 5] * 11
    header = [["Image Name", "Histological Diagnosis", "Common Nevus", "Atypical Nevus", "Melanoma"]]
    marks = [[name, None] + ["X" if code == c else None for c in range(3)] for name, code in PH2_CASES.items()]
    sheet = pd.DataFrame(legend + header + marks)
    try:
        import openpyxl  # noqa: F401
    except ImportError:
        (dataset_root / "PH2_dataset.xlsx").write_bytes(b"PK\x03\x04")
        with pytest.raises(ImportError, match="pip install openpyxl"):
            load_ph2(tmp_path)
        return
    sheet.to_excel(dataset_root / "PH2_dataset.xlsx", header=False, index=False)
    assert column_values(load_ph2(tmp_path, labels="ph2"), "label") == list(PH2_CASES.values())


# --------------------------------------------------------------------------------------------------------------------
# The one dispatch
# --------------------------------------------------------------------------------------------------------------------
def test_load_source_dispatches_every_layout(data_root: Path, tmp_path: Path):
    assert set(LOADERS) >= {"ham10000", "isic2016_task1", "isic2017", "isic2018_task1", "isic2019", "ph2"}
    _ph2_download(tmp_path / "ph2")
    isic2017 = _isic2017_download(tmp_path / "isic2017")
    ph2 = load_source("ph2", tmp_path / "ph2", masks="optional", labels="ph2")
    assert column_values(ph2, "image_id") == list(PH2_CASES)
    training = load_source("isic2017", isic2017, split="Training", masks=True, labels="ham10000")
    assert len(training) == len(TRAINING_2017) + 1 and "mel" in training.features["label"].names
    assert len(load_source("isic2017", ISIC2017, masks=True)) == int(_manifest()["has_isic2017_mask"].sum())
    with pytest.raises(ValueError, match=r"does not take \['split'\].*load_ph2 takes \['masks', 'labels'"):
        load_source("ph2", tmp_path / "ph2", split="Training")
    with pytest.raises(ValueError, match="ISIC 2019 has no lesion masks"):
        load_source("isic2019", DATA_ROOT / "isic2019", masks=True)
    with pytest.raises(ValueError, match=r"Unknown dataset 'ph3'.*'isic2016_task1'"):
        load_source("ph3", tmp_path)
