"""Data layer: loaders on the shared copies of HAM10000 / ISIC 2017 / ISIC 2019 and on custom layouts, grouped splits,
joint augmentation, and bad-file handling. The official ISIC 2016/2017/2018 Task 1 and PH2 layouts are tested in
test_official_layouts.py."""

import logging
import math
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PRESETS
from PIL import Image

from modeling_skinlesion import SkinLesionImageProcessor, SkinLesionMetadataProcessor
from modeling_skinlesion.configuration_skinlesion import SkinDualNetConfig
from modeling_skinlesion.data import (
    HAM10000_LABELS,
    ISIC2019_LABELS,
    SCHEMA_COLUMNS,
    SkinLesionTransform,
    balanced_class_weights,
    build_dataloader,
    check_no_group_leak,
    class_counts,
    column_values,
    concatenate_sources,
    grouped_split,
    load_clinic,
    load_ham10000,
    load_hub,
    load_isic2017,
    load_isic2019,
    load_source,
    map_columns,
    prepare_for_transform,
    validate_files,
)


@pytest.fixture(scope="module")
def ham(data_root: Path) -> datasets.Dataset:
    return load_ham10000(data_root / "ham10000", masks=True)


def _link(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source.resolve())
    return target


def _ham_rows(data_root: Path, n: int, **query) -> pd.DataFrame:
    table = pd.read_csv(data_root / "ham10000" / "HAM10000_metadata.csv")
    for column, value in query.items():
        table = table[table[column] == value]
    return table.head(n).reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------------------
def test_ham10000_real_layout(ham: datasets.Dataset, data_root: Path):
    table = pd.read_csv(data_root / "ham10000" / "HAM10000_metadata.csv")
    assert tuple(ham.column_names) == SCHEMA_COLUMNS
    assert len(ham) == len(table) == 8502
    assert ham.features["label"].names == HAM10000_LABELS
    assert isinstance(ham.features["image"], datasets.Image)
    # Only paths are stored; decoding happens on access.
    raw = prepare_for_transform(ham.select(range(3)))[0]
    assert raw["image"]["bytes"] is None and raw["image"]["path"].endswith(".jpg")
    row = ham[0]
    expected = table.iloc[0]
    assert row["image_id"] == expected["image_id"] and row["group_id"] == expected["lesion_id"]
    assert HAM10000_LABELS[row["label"]] == expected["dx"]
    assert row["site"] == expected["localization"] and row["sex"] == expected["sex"]
    assert row["age"] == pytest.approx(expected["age"]) and row["source"] == "ham10000"
    assert row["image"].size == row["mask"].size == (200, 150)
    assert all(
        mask is not None
        for mask in column_values(
            ham.select_columns(["mask"]).cast_column("mask", datasets.Image(decode=False)), "mask"
        )
    )
    assert class_counts(ham) == [int((table["dx"] == name).sum()) for name in HAM10000_LABELS]
    ages = np.array(column_values(ham, "age"), dtype=float)
    assert np.isnan(ages).sum() == table["age"].isna().sum()

    as_isic = load_ham10000(data_root / "ham10000", masks=False, labels="isic2019")
    assert as_isic.features["label"].names == ISIC2019_LABELS
    assert ISIC2019_LABELS[as_isic[0]["label"]] == "BKL" and as_isic[0]["mask"] is None


def test_ham10000_split_folders_missing_files_and_masks(data_root: Path, tmp_path: Path, caplog):
    rows = _ham_rows(data_root, 6)
    source = data_root / "ham10000"
    for i, image_id in enumerate(rows["image_id"]):
        if i == 5:  # listed in the CSV, image absent
            continue
        _link(
            source / "images" / f"{image_id}.jpg", tmp_path / f"HAM10000_images_part_{1 + i % 2}" / f"{image_id}.jpg"
        )
        if i != 4:  # image 4 has no mask
            name = f"{image_id}_segmentation.png"
            _link(source / "masks" / name, tmp_path / "HAM10000_segmentations_lesion_tschandl" / name)
    rows.to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    missing_id = rows["image_id"][5]

    with caplog.at_level(logging.WARNING, logger="modeling_skinlesion.data"):
        dataset = load_ham10000(tmp_path, masks=True)
    assert len(dataset) == 5 and missing_id in caplog.text
    with pytest.raises(ValueError, match=missing_id):
        load_ham10000(tmp_path, masks=True, on_missing="raise")
    assert dataset[4]["mask"] is None and dataset[0]["mask"] is not None
    kept, summary = validate_files(dataset)
    assert len(kept) == 4 and [p[0] for p in summary.missing_masks] == [rows["image_id"][4]]
    with pytest.raises(ValueError, match=rows["image_id"][4]):
        validate_files(dataset, on_error="raise")
    # Masks are optional for classification: no problem reported.
    _, summary = validate_files(dataset, require_masks=False)
    assert summary.problems == []
    with pytest.raises(ValueError, match="`masks`"):
        load_ham10000(tmp_path, masks="yes")
    with pytest.raises(ValueError, match="`labels`"):
        load_ham10000(tmp_path, labels="isic2020")
    with pytest.raises(ValueError, match="`root`"):
        load_ham10000(tmp_path / "nowhere")


def test_isic2017_real_layout(data_root: Path):
    pairs = load_isic2017(data_root / "isic2017")
    manifest = pd.read_csv(data_root / "isic2017" / "manifest.csv")
    assert len(pairs) == int(manifest["has_isic2017_mask"].sum()) == 456
    row = pairs[0]
    assert row["image"].size == row["mask"].size
    assert row["group_id"] == row["image_id"] and row["source"] == "isic2017"
    diagnosis = dict(zip(manifest["image_id"], manifest["diagnosis"]))
    names = pairs.features["label"].names
    for image_id, label in zip(column_values(pairs, "image_id")[:50], column_values(pairs, "label")[:50]):
        expected = {"melanoma": "MEL", "nevus": "NV"}.get(diagnosis[image_id])
        assert (names[label] if label >= 0 else None) == expected
    everything = load_isic2017(data_root / "isic2017", masks="optional")
    assert len(everything) == len(manifest)
    assert sum(m is not None for m in prepare_for_transform(everything)["mask"]) == 456


def test_isic2019_layout_with_downsampled_names(data_root: Path, tmp_path: Path):
    truth = pd.read_csv(data_root / "isic2019" / "ISIC_2019_Training_GroundTruth.csv")
    meta = pd.read_csv(data_root / "isic2019" / "ISIC_2019_Training_Metadata.csv")
    for name in ("ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv"):
        _link(data_root / "isic2019" / name, tmp_path / name)
    plain = truth[~truth["image"].str.endswith("_downsampled")]["image"].head(3).tolist()
    downsampled = truth[truth["image"].str.endswith("_downsampled")]["image"].head(3).tolist()
    ham_lesion = meta[meta["lesion_id"].notna()]["image"].head(1).tolist()
    jpgs = sorted((data_root / "ham10000" / "images").glob("*.jpg"))
    folder = tmp_path / "ISIC_2019_Training_Input"
    # Files named as in the CSV, plus one `_downsampled` image stored without the suffix.
    names = plain + downsampled[:2] + [downsampled[2].replace("_downsampled", "")] + ham_lesion
    for jpg, name in zip(jpgs, names):
        _link(jpg, folder / f"{name}.jpg")

    dataset = load_isic2019(tmp_path)
    expected = plain + downsampled + ham_lesion
    assert sorted(column_values(dataset, "image_id")) == sorted(expected)
    assert dataset.features["label"].names == ISIC2019_LABELS
    by_id = {row["image_id"]: row for row in prepare_for_transform(dataset)}
    truth_by_id = truth.set_index("image")
    meta_by_id = meta.set_index("image")
    for name in expected:
        row = by_id[name]
        assert ISIC2019_LABELS[row["label"]] == truth_by_id.loc[name, ISIC2019_LABELS].astype(float).idxmax()
        assert row["site"] == meta_by_id.loc[name, "anatom_site_general"]
        age = meta_by_id.loc[name, "age_approx"]
        assert (math.isnan(row["age"]) and math.isnan(age)) or row["age"] == pytest.approx(age)
        lesion = meta_by_id.loc[name, "lesion_id"]
        assert row["group_id"] == (lesion if isinstance(lesion, str) else name.replace("_downsampled", ""))
    assert by_id[downsampled[2]]["image"]["path"].endswith(downsampled[2].replace("_downsampled", "") + ".jpg")
    assert dataset[0]["image"].size == (200, 150)

    # UNK rows are dropped (the shared CSV has none: add one).
    unknown = truth.head(1).copy()
    unknown[ISIC2019_LABELS] = 0.0
    unknown["UNK"] = 1.0
    unknown["image"] = "ISIC_9999999"
    edited = tmp_path / "edited"
    edited.mkdir()
    unknown.to_csv(edited / "ISIC_2019_Training_GroundTruth.csv", index=False)
    _link(data_root / "isic2019" / "ISIC_2019_Training_Metadata.csv", edited / "ISIC_2019_Training_Metadata.csv")
    _link(jpgs[0], edited / "ISIC_2019_Training_Input" / "ISIC_9999999.jpg")
    assert len(load_isic2019(edited)) == 0
    assert column_values(load_isic2019(edited, keep_unknown=True), "label") == [-1]

    # Under HAM10000's names: the HAM10000 images get their `dx`, an SCC image (HAM10000 has none) no label.
    ham_dx = pd.read_csv(data_root / "ham10000" / "HAM10000_metadata.csv").set_index("image_id")["dx"]
    for image_id in ham_dx.index[:3]:
        _link(data_root / "ham10000" / "images" / f"{image_id}.jpg", folder / f"{image_id}.jpg")
    as_ham = load_isic2019(tmp_path, labels="ham10000")
    assert as_ham.features["label"].names == HAM10000_LABELS
    pairs = zip(column_values(as_ham, "image_id"), column_values(as_ham, "label"))
    in_ham = [(image_id, label) for image_id, label in pairs if image_id in ham_dx]
    assert len(in_ham) == 3 and all(HAM10000_LABELS[label] == ham_dx[image_id] for image_id, label in in_ham)
    scc = truth.head(1).copy()
    scc[ISIC2019_LABELS] = 0.0
    scc["SCC"] = 1.0
    scc["image"] = "ISIC_9999999"
    scc.to_csv(edited / "ISIC_2019_Training_GroundTruth.csv", index=False)
    assert column_values(load_isic2019(edited), "label") == [ISIC2019_LABELS.index("SCC")]
    assert column_values(load_isic2019(edited, labels="ham10000"), "label") == [-1]
    with pytest.raises(ValueError, match="no lesion masks"):
        load_isic2019(edited, masks=True)


def _clinic(data_root: Path, tmp_path: Path, n: int = 9) -> tuple[Path, Path, pd.DataFrame]:
    rows = pd.concat([_ham_rows(data_root, 3, dx=dx) for dx in ("mel", "nv", "bcc")]).reset_index(drop=True)[:n]
    images = tmp_path / "photos"
    for i, image_id in enumerate(rows["image_id"]):
        _link(data_root / "ham10000" / "images" / f"{image_id}.jpg", images / f"batch{i % 2}" / f"{image_id}.jpg")
    csv = pd.DataFrame(
        {
            "file": [
                f"batch{i % 2}/{image_id}.jpg" if i % 3 else image_id for i, image_id in enumerate(rows["image_id"])
            ],
            "diagnosis": rows["dx"].map({"mel": "melanoma", "nv": "naevus", "bcc": "carcinoma"}),
            "patient_age": rows["age"].astype("Int64").astype(str),
            "gender": rows["sex"],
            "body_site": rows["localization"],
            "patient": [f"P{i // 2}" for i in range(len(rows))],
        }
    )
    path = tmp_path / "clinic.csv"
    csv.to_csv(path, index=False)
    return images, path, rows


def test_clinic_layout_with_column_map(data_root: Path, tmp_path: Path):
    images, csv, rows = _clinic(data_root, tmp_path)
    column_map = {
        "image": "file",
        "label": "diagnosis",
        "age": "patient_age",
        "sex": "gender",
        "site": "body_site",
        "group_id": "patient",
    }
    # Through the one dispatch, as the scripts load it: the images folder is the root.
    dataset = load_source(
        "clinic", images, csv_path=csv, column_map=column_map, label_names=["naevus", "melanoma", "carcinoma"]
    )
    assert len(dataset) == 9 and dataset.features["label"].names == ["naevus", "melanoma", "carcinoma"]
    assert column_values(dataset, "label") == [1, 1, 1, 0, 0, 0, 2, 2, 2]
    assert column_values(dataset, "image_id") == rows["image_id"].tolist()
    assert column_values(dataset, "group_id")[:3] == ["P0", "P0", "P1"]
    assert column_values(dataset, "age")[0] == pytest.approx(rows["age"][0])
    assert column_values(dataset, "site") == rows["localization"].tolist()
    assert dataset[0]["image"].size == (200, 150) and dataset[0]["mask"] is None
    # Default label order: sorted names.
    assert load_clinic(images, csv, {"image": "file", "label": "diagnosis"}).features["label"].names == [
        "carcinoma",
        "melanoma",
        "naevus",
    ]
    with pytest.raises(ValueError, match=r"does not have.*'diagnosis_code'.*Its columns are \['file', 'diagnosis'"):
        load_clinic(images, csv, {"image": "file", "label": "diagnosis_code"})
    with pytest.raises(ValueError, match="unknown keys \\['diagnosis'\\]"):
        load_clinic(images, csv, {"image": "file", "diagnosis": "diagnosis"})
    with pytest.raises(ValueError, match="must map 'image'.*'file'"):
        load_clinic(images, csv, {"label": "diagnosis"})
    with pytest.raises(ValueError, match="carcinoma"):
        load_clinic(images, csv, {"image": "file", "label": "diagnosis"}, label_names=["naevus", "melanoma"])


def test_map_columns_and_offline_hub(data_root: Path):
    rows = _ham_rows(data_root, 4)
    local = datasets.Dataset.from_dict(
        {
            "img": [str(data_root / "ham10000" / "images" / f"{i}.jpg") for i in rows["image_id"]],
            "dx": rows["dx"].tolist(),
            "years": rows["age"].tolist(),
        },
        features=datasets.Features(
            {"img": datasets.Image(), "dx": datasets.Value("string"), "years": datasets.Value("float64")}
        ),
    )
    mapped = map_columns(local, {"image": "img", "label": "dx", "age": "years"}, label_names=HAM10000_LABELS)
    assert tuple(mapped.column_names) == SCHEMA_COLUMNS
    assert column_values(mapped, "label") == [HAM10000_LABELS.index(d) for d in rows["dx"]]
    assert column_values(mapped, "image_id") == rows["image_id"].tolist() == column_values(mapped, "group_id")
    assert mapped[0]["image"].size == (200, 150)
    classed = local.cast_column("dx", datasets.ClassLabel(names=HAM10000_LABELS))
    assert map_columns(classed, {"image": "img", "label": "dx"}).features["label"].names == HAM10000_LABELS
    with pytest.raises(ValueError, match="Its columns are \\['img', 'dx', 'years'\\]"):
        map_columns(local, {"image": "picture"})
    with pytest.raises(ValueError, match="network"):
        load_hub("someorg/skin-lesions-that-do-not-exist", column_map={"image": "image"})


def test_concatenate_checks_label_names(ham: datasets.Dataset, data_root: Path):
    pairs = load_isic2017(data_root / "isic2017")
    with pytest.raises(ValueError, match="different label names"):
        concatenate_sources([ham.select(range(4)), pairs.select(range(4))])
    joined = concatenate_sources([ham.select(range(4)), pairs.select(range(4))], drop_labels=True)
    assert len(joined) == 8 and set(column_values(joined, "label")) == {-1}
    assert set(column_values(joined, "source")) == {"ham10000", "isic2017"}


# --------------------------------------------------------------------------------------------------------------------
# Grouped split
# --------------------------------------------------------------------------------------------------------------------
def test_grouped_split_no_leak_stratified_reproducible(ham: datasets.Dataset):
    splits = grouped_split(ham, val_size=0.15, test_size=0.1, seed=3)
    assert set(splits) == {"train", "validation", "test"}
    assert sum(len(s) for s in splits.values()) == len(ham)
    groups = {name: set(column_values(split, "group_id")) for name, split in splits.items()}
    assert not groups["train"] & groups["validation"] and not groups["train"] & groups["test"]
    assert not groups["validation"] & groups["test"]
    # Lesions with several images exist, and they stay together.
    assert max(pd.Series(column_values(ham, "group_id")).value_counts()) > 1
    total = np.array(class_counts(ham), dtype=float)
    for name, share in (("validation", 0.15), ("test", 0.1)):
        counts = np.array(class_counts(splits[name]))
        assert len(splits[name]) / len(ham) == pytest.approx(share, abs=0.01)
        np.testing.assert_allclose(counts / total, share, atol=0.05)  # every class gets its share
    again = grouped_split(ham, val_size=0.15, test_size=0.1, seed=3)
    assert column_values(again["validation"], "image_id") == column_values(splits["validation"], "image_id")
    other = grouped_split(ham, val_size=0.15, test_size=0.1, seed=4)
    assert column_values(other["validation"], "image_id") != column_values(splits["validation"], "image_id")
    assert "test" not in grouped_split(ham.select(range(200)), val_size=0.2)


def test_leak_check_names_leaked_groups(ham: datasets.Dataset):
    splits = grouped_split(ham.select(range(400)), val_size=0.2, seed=0)
    leaked = splits["train"][0]["group_id"]
    broken = datasets.DatasetDict(
        train=splits["train"], validation=concatenate_sources([splits["validation"], splits["train"].select([0])])
    )
    with pytest.raises(ValueError, match=f"{leaked} in \\['train', 'validation'\\]"):
        check_no_group_leak(broken)
    with pytest.raises(ValueError, match="val_size"):
        grouped_split(ham, val_size=1.2)
    with pytest.raises(ValueError, match="'patient'"):
        grouped_split(ham, group_column="patient")


def test_balanced_class_weights(ham: datasets.Dataset, data_root: Path):
    from sklearn.utils.class_weight import compute_class_weight

    dx = pd.read_csv(data_root / "ham10000" / "HAM10000_metadata.csv")["dx"].to_numpy()
    expected = compute_class_weight("balanced", classes=np.array(HAM10000_LABELS), y=dx)
    np.testing.assert_allclose(balanced_class_weights(ham), expected, rtol=1e-6)
    # A class absent from the data gets weight 1.
    without_df = ham.select([i for i, d in enumerate(dx) if d != "df"])
    weights = balanced_class_weights(without_df)
    assert weights[HAM10000_LABELS.index("df")] == 1.0
    kept = dx[dx != "df"]
    present = np.array([name for name in HAM10000_LABELS if name != "df"])
    np.testing.assert_allclose(
        [w for name, w in zip(HAM10000_LABELS, weights) if name != "df"],
        compute_class_weight("balanced", classes=present, y=kept),
        rtol=1e-6,
    )


# --------------------------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------------------------
def _tiny_processors(image_size: int = 64) -> tuple[SkinLesionImageProcessor, SkinLesionMetadataProcessor]:
    config = SkinDualNetConfig.from_pretrained(PRESETS / "skin-dualnet-tiny.json", image_size=image_size)
    return SkinLesionImageProcessor.from_model_config(config), SkinLesionMetadataProcessor.from_config(config)


def _batch(rows: list[dict]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]}


def test_augmentation_keeps_image_and_mask_aligned(ham: datasets.Dataset, tmp_path: Path):
    """Paint the lesion pure green in the image: after any augmentation the green pixels must be the mask."""
    processor, _ = _tiny_processors(image_size=128)
    rows = prepare_for_transform(ham.select(range(6)))
    painted = []
    for row in rows:
        image = np.asarray(Image.open(row["image"]["path"]).convert("RGB")).copy()
        mask = np.asarray(Image.open(row["mask"]["path"])) > 127
        image[mask] = (0, 255, 0)
        path = tmp_path / f"{row['image_id']}.png"  # lossless, so the colour survives
        Image.fromarray(image).save(path)
        painted.append({**row, "image": {"path": str(path), "bytes": None}})
    batch = _batch(painted)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    outputs = []
    for seed in range(3):
        transform = SkinLesionTransform(processor, train=True, seed=seed, brightness=0, contrast=0, saturation=0)
        out = transform(batch)
        outputs.append(out["pixel_values"])
        pixels = out["pixel_values"] * std + mean
        green = (pixels[:, 1] > 0.8) & (pixels[:, 0] < 0.2) & (pixels[:, 2] < 0.2)
        mask = out["lesion_mask"][:, 0] > 0.5
        for i in range(len(painted)):
            intersection = (green[i] & mask[i]).sum().item()
            union = (green[i] | mask[i]).sum().item()
            # 0.93 or more measured at 128 px; shifting the mask alone by two pixels drops four of the six below 0.9.
            assert union > 100 and intersection / union > 0.9, (seed, i, intersection / union)
    assert not torch.allclose(outputs[0], outputs[1])
    # Evaluation equals the image processor exactly.
    evaluation = SkinLesionTransform(processor, train=False)(batch)
    reference = processor.preprocess([Image.open(r["image"]["path"]) for r in painted])["pixel_values"]
    torch.testing.assert_close(evaluation["pixel_values"], reference)


def test_augmentation_is_seeded_per_image_and_epoch(ham: datasets.Dataset):
    processor, _ = _tiny_processors()
    rows = prepare_for_transform(ham.select(range(4))).to_list()
    transform = SkinLesionTransform(processor, train=True, seed=7)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = transform(_batch(rows))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    torch.manual_seed(2)
    reordered = transform(_batch(rows[::-1]))  # another batch position, another global RNG state
    assert reordered["image_id"] == first["image_id"][::-1]
    assert torch.equal(reordered["pixel_values"].flip(0), first["pixel_values"])
    assert torch.equal(reordered["lesion_mask"].flip(0), first["lesion_mask"])
    transform.set_epoch(1)
    assert not torch.allclose(transform(_batch(rows))["pixel_values"], first["pixel_values"])
    # Shapes and dtypes the models take.
    assert first["pixel_values"].shape == (4, 3, 64, 64) and first["pixel_values"].dtype == torch.float32
    assert first["lesion_mask"].shape == (4, 1, 64, 64) and first["lesion_mask"].dtype == torch.float32
    assert set(first["lesion_mask"].unique().tolist()) == {0.0, 1.0}
    assert first["has_mask"].dtype == torch.bool and first["labels"].dtype == torch.int64
    assert first["labels"].tolist() == column_values(ham.select(range(4)), "label")


def test_colour_jitter_changes_image_not_mask(ham: datasets.Dataset):
    processor, metadata = _tiny_processors()
    rows = prepare_for_transform(ham.select([5, 6])).to_list()  # HAM10000: male / face, female / back
    still = dict(zoom=(1.0, 1.0), max_rotation=0, max_shift=0, flips=False, rotate90=False)
    plain = SkinLesionTransform(processor, train=True, brightness=0, contrast=0, saturation=0, **still)(_batch(rows))
    jittered = SkinLesionTransform(processor, train=True, metadata_processor=metadata, **still)(_batch(rows))
    assert torch.equal(plain["lesion_mask"], jittered["lesion_mask"])
    assert not torch.allclose(plain["pixel_values"], jittered["pixel_values"])
    # Without geometry or colour the training path is the resize + normalisation of inference.
    reference = processor.preprocess([Image.open(row["image"]["path"]) for row in rows])["pixel_values"]
    torch.testing.assert_close(plain["pixel_values"], reference, atol=1e-5, rtol=0)
    # The preset's vocabularies: sex ["unknown", "male", "female"]; face → head/neck (5), back → posterior torso (2).
    assert jittered["sex_ids"].tolist() == [1, 2] and jittered["site_ids"].tolist() == [5, 2]


# --------------------------------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------------------------------
def _with_bad_files(ham: datasets.Dataset, tmp_path: Path) -> tuple[datasets.Dataset, dict[str, str]]:
    rows = prepare_for_transform(ham.select(range(8))).to_list()
    truncated = tmp_path / "truncated.jpg"
    data = Path(rows[1]["image"]["path"]).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    rows[1]["image"] = {"path": str(truncated), "bytes": None}
    rows[3]["image"] = {"path": str(text), "bytes": None}
    rows[5]["image"] = {"path": str(tmp_path / "deleted.jpg"), "bytes": None}
    rows[6]["mask"] = None
    features = ham.features.copy()
    table = {key: [row[key] for row in rows] for key in rows[0]}
    dataset = datasets.Dataset.from_dict(table, features=prepare_for_transform(ham).features).cast(features)
    names = {rows[i]["image_id"]: kind for i, kind in ((1, "truncated"), (3, "not an image"), (5, "not found"))}
    names[rows[6]["image_id"]] = "no mask"
    return dataset, names


def test_validate_files_reports_bad_files_by_name(ham: datasets.Dataset, tmp_path: Path):
    dataset, names = _with_bad_files(ham, tmp_path)
    kept, summary = validate_files(dataset, on_error="skip")
    assert len(kept) == 4 and summary.num_checked == 8 and summary.num_kept == 4
    assert sorted(summary.bad_names) == sorted(names)
    reasons = {image_id: reason for image_id, _, reason in summary.problems}
    for image_id, kind in names.items():
        assert kind in reasons[image_id] or (kind == "truncated" and "truncated" in reasons[image_id])
    assert "truncated.jpg" in str(summary) and "notes.jpg" in str(summary) and "deleted.jpg" in str(summary)
    assert not set(column_values(kept, "image_id")) & set(names)
    with pytest.raises(ValueError, match="notes.jpg"):
        validate_files(dataset, on_error="raise")
    # Classification data: no mask is fine, the broken images are still reported.
    _, summary = validate_files(dataset, require_masks=False)
    assert len(summary.problems) == 3
    with pytest.raises(ValueError, match="on_error"):
        validate_files(dataset, on_error="ignore")


def test_dataloader_skips_bad_files_and_finishes(ham: datasets.Dataset, tmp_path: Path, caplog):
    dataset, names = _with_bad_files(ham, tmp_path)
    processor, metadata = _tiny_processors()
    loader = build_dataloader(
        dataset, SkinLesionTransform(processor, train=True, metadata_processor=metadata), batch_size=3, shuffle=True
    )
    seen, dropped = [], []
    with caplog.at_level(logging.WARNING, logger="modeling_skinlesion.data"):
        for batch in loader:
            assert batch["pixel_values"].shape[0] == len(batch["image_id"]) == batch["labels"].shape[0]
            seen += batch["image_id"]
            dropped += batch["dropped"]
    bad_images = {n for n, kind in names.items() if kind != "no mask"}
    assert set(dropped) == bad_images and len(seen) == 5
    for name in bad_images:
        assert name in caplog.text
    # A batch made only of bad files comes out empty instead of raising.
    only_bad = dataset.select([1, 3, 5])
    batch = next(iter(build_dataloader(only_bad, SkinLesionTransform(processor), batch_size=3)))
    assert batch["pixel_values"].shape == (0, 3, 64, 64) and len(batch["dropped"]) == 3
