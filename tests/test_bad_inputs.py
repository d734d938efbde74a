"""Every bad input gets a clear ValueError naming the argument (STYLE.md section 4)."""

import pytest
import torch
from conftest import tiny_classifier, tiny_segmenter

import modeling_skinlesion as sl


@pytest.fixture(scope="module")
def classifier():
    return tiny_classifier()


@pytest.fixture(scope="module")
def segmenter():
    return tiny_segmenter()


IMAGES = torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pixel_values": torch.randn(2, 1, 64, 64)}, r"`pixel_values` must have shape \(batch_size, 3"),
        ({"pixel_values": torch.randn(3, 64, 64)}, r"`pixel_values` must have shape"),
        ({"pixel_values": torch.zeros(2, 3, 64, 64, dtype=torch.long)}, "floating-point"),
        ({"pixel_values": None}, "`pixel_values` is required"),
        ({"pixel_values": torch.randn(2, 3, 16, 64)}, "smaller than the encoder's total stride"),
        ({"pixel_values": IMAGES, "lesion_mask": torch.ones(3, 1, 64, 64)}, "`lesion_mask` has batch size 3"),
        ({"pixel_values": IMAGES, "lesion_mask": torch.ones(2, 1, 32, 32)}, r"`lesion_mask` is \(32, 32\)"),
        ({"pixel_values": IMAGES, "lesion_mask": torch.ones(2, 2, 64, 64)}, "`lesion_mask` must have shape"),
        ({"pixel_values": IMAGES, "age": torch.ones(3)}, "`age` has batch size 3"),
        ({"pixel_values": IMAGES, "sex_ids": torch.ones(2, 1, dtype=torch.long)}, "`sex_ids` must be a 1-D"),
        ({"pixel_values": IMAGES, "site_ids": torch.ones(1, dtype=torch.long)}, "`site_ids` has batch size 1"),
        ({"pixel_values": IMAGES, "labels": torch.tensor([0, 9])}, r"`labels` must be integer class indices"),
        ({"pixel_values": IMAGES, "labels": torch.tensor([0.0, 1.0])}, r"`labels` must be integer class indices"),
        ({"pixel_values": IMAGES, "lesion_pixel_values": torch.randn(1, 3, 64, 64)}, "`lesion_pixel_values` has"),
    ],
)
def test_classifier_inputs(classifier, kwargs, match):
    with pytest.raises(ValueError, match=match):
        classifier(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pixel_values": torch.randn(2, 4, 64, 64)}, r"`pixel_values` must have shape"),
        ({"pixel_values": torch.randn(1, 3, 31, 31)}, "smaller than the encoder's total stride"),
        ({"pixel_values": IMAGES, "labels": torch.ones(2, 1, 48, 64)}, r"`labels` is \(48, 64\)"),
        ({"pixel_values": IMAGES, "labels": torch.ones(4, 64, 64)}, "`labels` has batch size 4"),
    ],
)
def test_segmenter_inputs(segmenter, kwargs, match):
    with pytest.raises(ValueError, match=match):
        segmenter(**kwargs)


def test_unknown_label_names():
    config = sl.SkinDualNetConfig()
    assert config.label_to_id("mel") == 4 and config.label_to_id(2) == 2
    with pytest.raises(ValueError, match=r"Unknown label 'melanoma'; valid labels: \['akiec'"):
        config.label_to_id("melanoma")
    with pytest.raises(ValueError, match="out of range"):
        config.label_to_id(7)


@pytest.mark.parametrize(
    ("config_class", "kwargs", "match"),
    [
        (sl.SkinDualNetConfig, {"image_size": -224}, "`image_size` must be positive"),
        (sl.SkinDualNetConfig, {"fusion_dim": 0}, "`fusion_dim` must be positive"),
        (sl.SkinDualNetConfig, {"fusion_heads": 7}, r"`fusion_dim` \(256\) must be divisible by `fusion_heads` \(7\)"),
        (sl.SkinDualNetConfig, {"metadata_heads": 3}, "divisible by `metadata_heads`"),
        (sl.SkinDualNetConfig, {"encoder_name": "densenet999"}, r"not a timm model name. Similar names: \['densenet"),
        (sl.SkinDualNetConfig, {"class_weights": [1.0, 2.0]}, "`class_weights` must hold 7"),
        (sl.SkinDualNetConfig, {"lesion_mode": "blur"}, "lesion_mode"),
        (sl.SkinDualNetConfig, {"site_vocab": ["torso"]}, "must start with the 'unknown' token"),
        (sl.SkinDualNetConfig, {"metadata_ffn_ratio": -1.0}, "`metadata_ffn_ratio` must be positive"),
        (sl.SkinDualNetConfig, {"metadata_dropout": 1.0}, r"`metadata_dropout` must lie in \[0, 1\)"),
        (sl.SkinDualNetConfig, {"image_std": [0.5, 0.5]}, "`image_std` must hold 3 numbers"),
        (
            sl.SkinLesionSegmenterConfig,
            {"decoder_channels": [64, 32, -1, 8, 4]},
            "`decoder_channels` must be positive",
        ),
        (sl.SkinLesionSegmenterConfig, {"aspp_rates": [1, 2]}, "three dilation rates"),
        (sl.SkinLesionSegmenterConfig, {"encoder_name": "not_a_model"}, "not a timm model name"),
    ],
)
def test_invalid_config_values(config_class, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        config_class(**kwargs)


def test_nested_segmenter_config_is_checked():
    with pytest.raises(ValueError, match="not a timm model name"):
        sl.SkinDualNetConfig(segmenter_config={"encoder_name": "unet9000"})


def test_image_size_below_the_trunks_stride():
    # The limit is the trunk's total stride as timm's `feature_info` states it, checked where the trunk exists.
    with pytest.raises(ValueError, match=r"`image_size` must be at least 32 \(the encoder's total stride"):
        tiny_classifier(image_size=16)


def test_segmenter_with_too_few_stages():
    # A ViT has no multi-scale feature pyramid for the decoder's skips.
    with pytest.raises((ValueError, RuntimeError)):
        sl.SkinLesionSegmenter(sl.SkinLesionSegmenterConfig(encoder_name="test_vit", image_size=64))
