"""Image, mask and metadata pre-processing; lesion-image construction; mask post-processing."""

import io
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_classifier
from PIL import Image

import modeling_skinlesion as sl
from modeling_skinlesion.image_processing_skinlesion import clean_mask, load_image, metadata_records

SIZE = 64


@pytest.fixture
def processor():
    return sl.SkinLesionImageProcessor(size=SIZE)


@pytest.fixture
def metadata():
    return sl.SkinLesionMetadataProcessor.from_config(sl.SkinDualNetConfig())


def reference_rgb() -> Image.Image:
    """Left half red, right half blue: orientation and colour are both checkable."""
    image = Image.new("RGB", (80, 60), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 40, 60))
    return image


class TestImageProcessor:
    def test_rgb_output_shape_and_normalisation(self, processor):
        out = processor(reference_rgb())
        assert out["pixel_values"].shape == (1, 3, SIZE, SIZE)
        red = out["pixel_values"][0, :, SIZE // 2, 2]
        expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(sl.image_processing_skinlesion.IMAGENET_MEAN)) / (
            torch.tensor(sl.image_processing_skinlesion.IMAGENET_STD)
        )
        torch.testing.assert_close(red, expected, atol=1e-3, rtol=0)

    @pytest.mark.parametrize(
        "image",
        [
            Image.new("L", (80, 60), 128),
            Image.new("RGBA", (80, 60), (128, 128, 128, 255)),
            Image.new("RGB", (80, 60), (128, 128, 128)).convert("P", palette=Image.Palette.ADAPTIVE),
            Image.fromarray(np.full((60, 80), 128 * 257, dtype=np.uint16)),
            np.full((60, 80), 128, dtype=np.uint8),
            np.full((60, 80, 3), 128, dtype=np.uint8),
            np.full((3, 60, 80), 128 / 255, dtype=np.float32),
            torch.full((3, 60, 80), 128 / 255),
        ],
        ids=["gray", "rgba", "palette", "16bit", "np-gray", "np-hwc", "np-chw-float", "torch-chw"],
    )
    def test_every_input_kind_gives_the_same_grey(self, processor, image):
        out = processor(image)["pixel_values"]
        grey = (128 / 255 - torch.tensor(sl.image_processing_skinlesion.IMAGENET_MEAN)) / torch.tensor(
            sl.image_processing_skinlesion.IMAGENET_STD
        )
        torch.testing.assert_close(out[0, :, 10, 10], grey, atol=2e-3, rtol=0)

    def test_transparent_pixels_become_white(self, processor):
        out = processor(Image.new("RGBA", (80, 60), (0, 0, 0, 0)))["pixel_values"]
        white = (1 - torch.tensor(sl.image_processing_skinlesion.IMAGENET_MEAN)) / torch.tensor(
            sl.image_processing_skinlesion.IMAGENET_STD
        )
        torch.testing.assert_close(out[0, :, 5, 5], white, atol=1e-3, rtol=0)

    def test_exif_rotation_is_applied(self, processor, tmp_path):
        path = tmp_path / "rotated.jpg"
        image = reference_rgb()
        exif = image.getexif()
        exif[0x0112] = 3  # Orientation: rotated 180 degrees
        image.save(path, exif=exif, quality=95)
        out = processor(str(path))["pixel_values"][0]
        # After the 180-degree turn the red half is on the right.
        assert out[0, SIZE // 2, SIZE - 3] > out[0, SIZE // 2, 2]

    def test_masks_are_resized_nearest_and_binary(self, processor):
        mask = np.zeros((60, 80), dtype=np.uint8)
        mask[20:40, 30:50] = 255
        out = processor([reference_rgb()], masks=[mask])
        assert out["lesion_mask"].shape == (1, 1, SIZE, SIZE)
        assert set(out["lesion_mask"].unique().tolist()) == {0.0, 1.0}

    def test_bad_inputs_raise_clear_errors(self, processor, tmp_path):
        text_file = tmp_path / "notes.jpg"
        text_file.write_text("not an image")
        with pytest.raises(ValueError, match="notes.jpg"):
            processor(str(text_file))
        truncated = tmp_path / "truncated.jpg"
        reference_rgb().save(tmp_path / "full.jpg")
        truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
        with pytest.raises(ValueError, match="truncated.jpg"):
            processor(str(truncated))
        with pytest.raises(ValueError, match="not found"):
            processor(str(tmp_path / "missing.png"))
        with pytest.raises(ValueError, match="must be a PIL image"):
            processor(42)
        with pytest.raises(ValueError, match="image array of shape"):
            processor(np.zeros((2, 5, 5, 5)))
        with pytest.raises(ValueError, match="one mask per image"):
            processor([reference_rgb(), reference_rgb()], masks=[np.zeros((60, 80))])
        with pytest.raises(ValueError, match="`size`"):
            sl.SkinLesionImageProcessor(size=-1)

    def test_decompression_bomb_is_refused_by_name(self, processor, tmp_path, monkeypatch):
        path = tmp_path / "bomb.png"
        Image.new("L", (400, 400)).save(path)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 400x400 is 16x the limit: PIL refuses it
        with pytest.raises(ValueError, match="bomb.png.*too large"):
            processor(str(path))

    def test_post_process_masks_cleans_and_resizes(self, processor):
        logits = torch.full((1, 1, 32, 32), -10.0)
        logits[0, 0, 4:20, 4:20] = 10.0  # the lesion, with a hole
        logits[0, 0, 10:12, 10:12] = -10.0
        logits[0, 0, 26:29, 26:29] = 10.0  # a speck
        (mask,) = processor.post_process_masks(logits, target_sizes=[(64, 96)])
        assert mask.shape == (64, 96) and mask.dtype == bool
        assert mask[22, 33] and not mask[55, 82], "hole filled, speck removed"
        (raw,) = processor.post_process_masks(logits, largest_component=False, fill_holes=False)
        assert raw[27, 27] and not raw[10, 10]

    def test_clean_mask_keeps_the_largest_component(self):
        mask = np.zeros((20, 20), bool)
        mask[1:4, 1:4] = True
        mask[8:18, 8:18] = True
        mask[12, 12] = False
        cleaned = clean_mask(mask)
        assert cleaned.sum() == 100 and not cleaned[2, 2]


class TestLoadImage:
    """`load_image`, the one reader of image files (the processor, the pipeline, the Space and the CLI use it)."""

    def test_files_bytes_and_pil_images_all_become_8_bit_rgb(self, tmp_path):
        path = tmp_path / "rotated.png"
        image = reference_rgb()
        exif = image.getexif()
        exif[0x0112] = 3  # Orientation: rotated 180 degrees
        image.save(path, exif=exif)
        with Image.open(path) as opened:
            raw = opened.copy()
        for source in (str(path), path, path.read_bytes(), io.BytesIO(path.read_bytes()), raw):
            loaded = load_image(source)
            assert loaded.mode == "RGB" and loaded.size == (80, 60)
            assert loaded.getpixel((2, 30)) == (0, 0, 255) and loaded.getpixel((77, 30)) == (255, 0, 0)  # turned

    @pytest.mark.parametrize(
        ("image", "expected"),
        [
            (Image.new("RGBA", (8, 6), (10, 20, 30, 0)), (255, 255, 255)),  # transparent: white
            (Image.new("LA", (8, 6), (0, 255)), (0, 0, 0)),  # opaque grey
            (Image.fromarray(np.full((6, 8), 200 * 257, dtype=np.uint16)), (200, 200, 200)),  # 16 bit → 8 bit
            (Image.new("L", (8, 6), 77), (77, 77, 77)),
        ],
        ids=["rgba", "la", "16bit", "grey"],
    )
    def test_modes_are_flattened_to_rgb(self, image, expected):
        loaded = load_image(image)
        assert loaded.mode == "RGB" and loaded.getpixel((3, 3)) == expected

    def test_the_processor_reads_files_through_it(self, processor, tmp_path):
        path = tmp_path / "lesion.png"
        Image.new("RGBA", (80, 60), (200, 100, 50, 128)).save(path)
        torch.testing.assert_close(processor(str(path))["pixel_values"], processor(load_image(path))["pixel_values"])

    def test_errors_name_the_file(self, tmp_path):
        (tmp_path / "notes.jpg").write_text("not an image")
        with pytest.raises(ValueError, match="notes.jpg"):
            load_image(tmp_path / "notes.jpg")
        with pytest.raises(ValueError, match="upload.png"):
            load_image(b"not an image", name="upload.png")


def test_metadata_records_one_per_image():
    record = {"age": 30}
    assert metadata_records(None, 2) == [None, None]
    assert metadata_records(record, 3) == [record] * 3
    assert metadata_records([record, None], 2) == [record, None]
    assert metadata_records(pd.DataFrame({"age": [1.0, 2.0]}), 2) == [{"age": 1.0}, {"age": 2.0}]
    with pytest.raises(ValueError, match="holds 1 records for 2 images"):
        metadata_records([record], 2)
    with pytest.raises(ValueError, match="got int"):
        metadata_records(42, 1)


class TestMetadataProcessor:
    def test_full_record(self, metadata):
        out = metadata({"age": 55, "sex": "female", "anatom_site_general": "anterior torso"})
        assert out["age"].tolist() == [55.0]
        assert metadata.sex_vocab[out["sex_ids"][0]] == "female"
        assert metadata.site_vocab[out["site_ids"][0]] == "anterior torso"

    @pytest.mark.parametrize(
        ("localization", "site"),
        [
            ("back", "posterior torso"),
            ("abdomen", "anterior torso"),
            ("face", "head/neck"),
            ("trunk", "torso"),
            ("acral", "palms/soles"),
            ("Lower Extremity", "lower extremity"),
            ("head_neck", "head/neck"),
        ],
    )
    def test_ham10000_sites_map_to_isic_vocabulary(self, metadata, localization, site):
        assert metadata.normalize_record({"localization": localization})["site"] == site

    def test_all_missing_and_no_metadata(self, metadata):
        out = metadata([{}, {"age": None, "sex": "unknown", "localization": "unknown"}])
        assert math.isnan(out["age"][0]) and math.isnan(out["age"][1])
        assert out["sex_ids"].tolist() == [0, 0] and out["site_ids"].tolist() == [0, 0]
        empty = metadata(None, batch_size=3)
        assert empty["sex_ids"].tolist() == [0, 0, 0]

    def test_some_missing(self, metadata):
        out = metadata([{"age": 40}, {"sex": "m"}, {"site": "palms/soles"}])
        assert out["age"][0] == 40 and math.isnan(out["age"][1])
        assert out["sex_ids"].tolist() == [0, 1, 0]
        assert out["site_ids"].tolist()[2] == metadata.site_vocab.index("palms/soles")

    def test_unknown_strings_warn_once_and_become_missing(self, metadata, caplog):
        with caplog.at_level(logging.WARNING):
            out = metadata([{"sex": "other", "site": "elbow"}] * 3)
        assert out["sex_ids"].tolist() == [0, 0, 0] and out["site_ids"].tolist() == [0, 0, 0]
        messages = [r.getMessage() for r in caplog.records]
        assert sum("'elbow'" in m for m in messages) == 1
        assert sum("'other'" in m for m in messages) == 1

    @pytest.mark.parametrize("age", [-3, 150, float("nan"), "forty", "nan"])
    def test_bad_ages_become_missing(self, metadata, age, caplog):
        with caplog.at_level(logging.WARNING):
            out = metadata({"age": age})
        assert math.isnan(out["age"][0])
        if age not in ("nan",) and not (isinstance(age, float) and math.isnan(age)):
            assert any("treating it as missing" in r.getMessage() for r in caplog.records)

    def test_pandas_rows_and_frames(self, metadata):
        frame = pd.DataFrame(
            {"age_approx": [30.0, np.nan], "sex": ["male", np.nan], "anatom_site_general": ["head/neck", np.nan]}
        )
        out = metadata(frame)
        assert out["sex_ids"].tolist() == [1, 0] and math.isnan(out["age"][1])
        row = metadata(frame.iloc[0])
        assert row["age"].tolist() == [30.0]

    def test_batch_mismatch_and_bad_records(self, metadata):
        with pytest.raises(ValueError, match="2 metadata records for a batch of 3"):
            metadata([{}, {}], batch_size=3)
        with pytest.raises(ValueError, match="mapping"):
            metadata([42])


class TestLesionImage:
    def test_mask_mode_blanks_background(self):
        pixels = torch.ones(1, 3, 64, 64)
        mask = torch.zeros(1, 1, 64, 64)
        mask[..., 16:48, 16:48] = 1
        lesion, boxes, empty = sl.build_lesion_image(pixels, mask, mode="mask")
        assert not empty.item() and lesion[0, :, 0, 0].abs().sum() == 0 and lesion[0, :, 32, 32].sum() == 3
        torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 64.0, 64.0]]))

    def test_crop_mode_zooms_on_the_lesion(self):
        pixels = torch.zeros(1, 3, 64, 64)
        pixels[..., 40:56, 8:24] = 1.0  # a bright lesion in the lower-left quadrant
        mask = (pixels[:, :1] > 0).float()
        lesion, boxes, empty = sl.build_lesion_image(pixels, mask, mode="crop", margin=0.0)
        x0, y0, x1, y1 = boxes[0].tolist()
        assert x0 <= 8 and y0 <= 40 and x1 >= 24 and y1 >= 56 and x1 - x0 == pytest.approx(32)
        assert lesion[0, 0].mean() > pixels[0, 0].mean() * 3, "the lesion fills much more of the crop"

    def test_empty_and_tiny_masks_fall_back_to_the_full_image(self):
        pixels = torch.randn(3, 3, 64, 64)
        mask = torch.zeros(3, 1, 64, 64)
        mask[1, 0, 30, 30] = 1  # one pixel: below min_fraction
        mask[2, 0, 10:40, 10:40] = 1
        lesion, boxes, empty = sl.build_lesion_image(pixels, mask, mode="mask_crop", min_fraction=0.005)
        assert empty.tolist() == [True, True, False]
        assert torch.equal(lesion[:2], pixels[:2])
        torch.testing.assert_close(boxes[:2], torch.tensor([[0.0, 0.0, 64.0, 64.0]] * 2))

    def test_model_flags_empty_mask(self):
        model = tiny_classifier()
        with torch.no_grad():
            out = model(pixel_values=torch.randn(2, 3, 64, 64), lesion_mask=torch.zeros(2, 1, 64, 64))
        assert out.mask_empty.tolist() == [True, True]
        assert torch.isfinite(out.logits).all()

    def test_unknown_mode(self):
        with pytest.raises(ValueError, match="lesion_mode"):
            sl.build_lesion_image(torch.zeros(1, 3, 64, 64), torch.zeros(1, 1, 64, 64), mode="blur")


def test_preprocess_applies_every_per_call_override_and_refuses_unknown_ones(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    processor = sl.SkinLesionImageProcessor(size=32)
    default = processor(image)["pixel_values"]
    assert default.shape == (1, 3, 32, 32)
    assert processor(image, size=48)["pixel_values"].shape == (1, 3, 48, 48)
    assert processor(image, size={"height": 20, "width": 30})["pixel_values"].shape == (1, 3, 20, 30)
    assert processor(image, do_resize=False)["pixel_values"].shape == (1, 3, 40, 50)
    raw = processor(image, do_resize=False, do_normalize=False)["pixel_values"]
    expected = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    torch.testing.assert_close(raw, expected, rtol=0, atol=1e-6)
    half = processor(image, do_resize=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)["pixel_values"]
    torch.testing.assert_close(half, (expected - 0.5) / 0.5, rtol=0, atol=1e-5)
    for bad in ({"do_rescale": False}, {"sizes": 32}):
        with pytest.raises(ValueError, match="Unknown option"):
            processor(image, **bad)
    with pytest.raises(ValueError, match="size"):
        processor(image, size={"height": 0, "width": 3})
    # Constructor settings survive save/load, and the reloaded processor behaves the same.
    custom = sl.SkinLesionImageProcessor(
        size={"height": 24, "width": 36}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4], do_normalize=False
    )
    custom.save_pretrained(tmp_path)
    reloaded = sl.SkinLesionImageProcessor.from_pretrained(tmp_path)
    assert reloaded.size == {"height": 24, "width": 36} and reloaded.do_normalize is False
    assert reloaded.image_mean == [0.4, 0.5, 0.6] and reloaded.image_std == [0.2, 0.3, 0.4]
    torch.testing.assert_close(reloaded(image)["pixel_values"], custom(image)["pixel_values"], rtol=0, atol=0)
