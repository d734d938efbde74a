"""Compatibility across refactors: a tiny checkpoint saved by the package before the issue-12 refactor (commit
731da3a; `tests/fixtures/make_compat_fixture.py` wrote it and the outputs it gave then) must load with today's code
and give the same outputs: the model's logits, the segmenter's, and what the pipeline returns (probabilities, label,
mask, Grad-CAM heatmaps, lesion focus)."""

import json

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from transformers import pipeline

from modeling_skinlesion import SkinDualNet, SkinLesionAnalyzer, SkinLesionImageProcessor
from modeling_skinlesion.image_processing_skinlesion import SkinLesionMetadataProcessor

FOLDER = FIXTURES / "compat"
EXPECTED = json.loads((FOLDER / "expected.json").read_text())

from fixtures.make_compat_fixture import compat_inputs, summarise  # noqa: E402


@pytest.fixture(scope="module")
def model() -> SkinDualNet:
    return SkinDualNet.from_pretrained(FOLDER).eval()


def test_saved_checkpoint_gives_the_same_logits(model):
    paths, metadata = compat_inputs(FOLDER)
    processor = SkinLesionImageProcessor.from_pretrained(FOLDER)
    pixel_values = processor(paths)["pixel_values"]
    with torch.no_grad():
        logits = model(
            pixel_values=pixel_values, **SkinLesionMetadataProcessor.from_config(model.config)(metadata)
        ).logits
        segmenter = model.segmenter(pixel_values=pixel_values).logits.sum(dim=(1, 2, 3))
    np.testing.assert_allclose(logits.numpy(), EXPECTED["logits"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(segmenter.numpy(), EXPECTED["segmenter_logit_sums"], rtol=1e-5, atol=1e-2)


def check_same(results: list[dict]) -> None:
    for got, expected in zip((summarise(r) for r in results), EXPECTED["pipeline"], strict=True):
        assert got["predicted_label"] == expected["predicted_label"]
        assert got["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
        assert got["mask_pixels"] == expected["mask_pixels"]
        assert got["heatmap_means"] == pytest.approx(expected["heatmap_means"], abs=1e-4)
        assert got["lesion_focus"] == pytest.approx(expected["lesion_focus"], abs=1e-4)


def test_saved_checkpoint_gives_the_same_analysis_through_the_pipeline(model):
    paths, metadata = compat_inputs(FOLDER)
    analyse = pipeline(
        "skin-lesion-analysis", model=model, image_processor=SkinLesionImageProcessor.from_pretrained(FOLDER)
    )
    check_same([analyse(path, metadata=record) for path, record in zip(paths, metadata)])


def test_saved_checkpoint_gives_the_same_analysis_through_the_analyzer(model):
    paths, metadata = compat_inputs(FOLDER)
    check_same(SkinLesionAnalyzer(model)(paths, metadata=metadata))
