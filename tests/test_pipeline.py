"""The "skin-lesion-analysis" pipeline (the inference stack), `SkinLesionAnalyzer` over it, and its Hub folder."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LABELS, real_images, tiny_classifier
from isolation import run_isolated
from PIL import Image
from transformers import pipeline

from modeling_skinlesion import SkinDualNet, SkinLesionAnalyzer, SkinLesionImageProcessor
from modeling_skinlesion.grad_cam_backend import SkinDualNetLibraryCAM
from modeling_skinlesion.pipeline_skinlesion import TASK, SkinLesionAnalysisPipeline


def calibrated(model: SkinDualNet) -> SkinDualNet:
    """Move the untrained segmenter's threshold so its masks cover part of real images (it marks everything or
    nothing otherwise)."""
    processor = SkinLesionImageProcessor.from_model_config(model.config.segmenter_config)
    with torch.no_grad():
        logits = model.segmenter(pixel_values=processor([str(p) for p in real_images(8)])["pixel_values"]).logits
        model.segmenter.segmentation_head.bias -= torch.quantile(logits.flatten(), 0.75)
    return model


@pytest.fixture(scope="module")
def model(data_root) -> SkinDualNet:
    return calibrated(tiny_classifier())


@pytest.fixture(scope="module")
def analyzer(model) -> SkinLesionAnalyzer:
    return SkinLesionAnalyzer(model)


@pytest.fixture(scope="module")
def images(data_root) -> list[Path]:
    """Two HAM10000 images (200 x 150) and two ISIC 2017 images (up to 768 px), all real."""
    return real_images(4)


def check_result(result: dict, size: tuple[int, int], branches: tuple[str, ...] = ("image", "lesion")) -> None:
    width, height = size
    assert list(result["probabilities"]) == LABELS
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["predicted_label"] == max(result["probabilities"], key=result["probabilities"].get)
    assert result["score"] == result["probabilities"][result["predicted_label"]]
    assert result["mask"].shape == (height, width) and result["mask"].dtype == bool
    assert result["mask_overlay"].size == (width, height)
    assert set(result["heatmaps"]) == set(result["heatmap_overlays"]) == set(result["lesion_focus"]) == set(branches)
    for branch in branches:
        heatmap = result["heatmaps"][branch]
        assert heatmap.shape == (height, width) and heatmap.dtype == np.float32
        assert heatmap.min() >= 0 and heatmap.max() <= 1
        assert result["heatmap_overlays"][branch].size == (width, height)
        focus = result["lesion_focus"][branch]
        assert math.isnan(focus) or 0.0 <= focus <= 1.0
    assert isinstance(result["mask_empty"], bool)


# --------------------------------------------------------------------------------------------------------------------
# SkinLesionAnalyzer (the convenience over the pipeline)
# --------------------------------------------------------------------------------------------------------------------
def test_analyzer_returns_everything_at_the_original_size(analyzer, images):
    results = analyzer([str(p) for p in images], metadata={"age": 60, "sex": "female", "site": "back"})
    assert len(results) == 4
    for path, result in zip(images, results):
        with Image.open(path) as image:
            check_result(result, image.size)
        assert result["lesion_image"].size == (64, 64)
        assert result["target_label"] == result["predicted_label"]
        assert result["metadata_used"] == {"age": 60.0, "sex": "female", "site": "posterior torso"}
        assert result["metadata_missing"] == [] and result["metadata_ignored"] == []
    partial = [r for r in results if 0.01 < r["mask_fraction"] < 0.9]
    assert partial, [r["mask_fraction"] for r in results]  # the calibrated segmenter gives real partial masks


def test_lesion_heatmap_is_zero_outside_the_lesion_box(analyzer, images):
    results = analyzer([str(p) for p in images])
    cropped = 0
    for result in results:
        height, width = result["mask"].shape
        x0, y0, x1, y1 = result["lesion_box"]
        assert 0 <= x0 < x1 <= width + 0.01 and 0 <= y0 < y1 <= height + 0.01
        rows, cols = np.arange(height) + 0.5, np.arange(width) + 0.5
        inside = ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]
        assert (result["heatmaps"]["lesion"][~inside] == 0).all()
        cropped += int((~inside).any())
        # The mask lies inside the box it was cropped from.
        assert not (result["mask"] & ~inside).any() or result["mask_empty"]
    assert cropped >= 1


def test_batches_give_the_same_results_as_single_images(analyzer, images):
    batch = analyzer([str(p) for p in images], batch_size=3)
    for path, together in zip(images, batch):
        alone = analyzer(Image.open(path))
        for label in LABELS:
            assert alone["probabilities"][label] == pytest.approx(together["probabilities"][label], abs=1e-5)
        assert (alone["mask"] == together["mask"]).all()
        for branch in ("image", "lesion"):
            assert np.abs(alone["heatmaps"][branch] - together["heatmaps"][branch]).max() < 1e-4


def test_explain_false_predicts_the_same_without_heatmaps(analyzer, images):
    explained = analyzer(str(images[2]))
    plain = analyzer(str(images[2]), explain=False)
    for label in LABELS:
        assert plain["probabilities"][label] == pytest.approx(explained["probabilities"][label], abs=1e-5)
    assert plain["heatmaps"] == plain["heatmap_overlays"] == plain["lesion_focus"] == {}
    assert plain["target_label"] is None
    assert (plain["mask"] == explained["mask"]).all()


def test_library_backend_gives_the_same_prediction(model, images):
    fast = SkinLesionAnalyzer(model)(str(images[0]), target_class="bkl")
    library = SkinLesionAnalyzer(model, explain_backend="library")(str(images[0]), target_class="bkl")
    assert isinstance(
        SkinLesionAnalyzer(model, method="scorecam", explain_backend="auto").explainer, SkinDualNetLibraryCAM
    )
    assert fast["probabilities"] == pytest.approx(library["probabilities"], abs=1e-5)
    assert fast["target_label"] == library["target_label"] == "bkl"
    for branch in ("image", "lesion"):
        # Same map up to resampling: the library resizes from the input size rather than from the layer's grid.
        assert np.abs(fast["heatmaps"][branch] - library["heatmaps"][branch]).max() < 0.05


def test_target_class_by_name_index_or_per_image(analyzer, images):
    paths = [str(p) for p in images[:2]]
    assert [r["target_label"] for r in analyzer(paths, target_class="mel")] == ["mel", "mel"]
    assert [r["target_label"] for r in analyzer(paths, target_class=["df", 1])] == ["df", "bcc"]
    with pytest.raises(ValueError, match=r"Unknown `target_class` 'melanoma'; the labels are \['akiec', 'bcc'"):
        analyzer(paths, target_class="melanoma")
    with pytest.raises(ValueError, match="holds 3 entries for 2 images"):
        analyzer(paths, target_class=["df", 1, 2])


def test_metadata_flags_used_missing_and_understood(analyzer, images):
    path = str(images[0])
    none = analyzer(path)
    assert none["metadata_used"] == {} and none["metadata_missing"] == ["age", "sex", "site"]
    records = [{"age": 45, "sex": "M", "localization": "lower extremity"}, {"age": 200, "site": "elbow?"}]
    full, odd = analyzer([path, path], metadata=records)
    assert full["metadata_used"] == {"age": 45.0, "sex": "male", "site": "lower extremity"}
    assert odd["metadata_used"] == {} and odd["metadata_missing"] == ["age", "sex", "site"]
    # The model uses what it is given: metadata changes the probabilities, nonsense behaves like nothing.
    assert full["probabilities"] != pytest.approx(none["probabilities"], abs=1e-6)
    assert odd["probabilities"] == pytest.approx(none["probabilities"], abs=1e-5)
    with pytest.raises(ValueError, match="one per image"):
        analyzer([path, path], metadata=[{"age": 3}])


def test_model_without_metadata_or_lesion_branch(data_root, images):
    model = calibrated(tiny_classifier(use_lesion_branch=False, use_metadata=False))
    result = SkinLesionAnalyzer(model)(str(images[2]), metadata={"age": 50, "sex": "female"})
    with Image.open(images[2]) as image:
        check_result(result, image.size, branches=("image",))
    assert result["lesion_image"] is None and result["lesion_box"] is None
    assert result["metadata_used"] == {} and result["metadata_ignored"] == ["age", "sex"]
    assert result["metadata_missing"] == ["site"]


@pytest.mark.parametrize("bias", [-1e4, 1e4], ids=["nothing", "everything"])
def test_lesion_focus_of_an_empty_and_a_full_mask(data_root, images, bias):
    """A segmenter that marks nothing: the lesion branch falls back to the whole image, flagged, and no heatmap mass
    lies on the (empty) lesion: focus 0. One that marks everything: all of it does: focus 1."""
    model = tiny_classifier()
    with torch.no_grad():
        model.segmenter.segmentation_head.bias.fill_(bias)
    result = SkinLesionAnalyzer(model)(str(images[0]))
    height, width = result["mask"].shape
    assert result["mask"].all() if bias > 0 else not result["mask"].any()
    assert result["mask_empty"] is (bias < 0)
    assert result["lesion_box"] == [0.0, 0.0, float(width), float(height)]
    expected = 1.0 if bias > 0 else 0.0
    focus = [v for v in result["lesion_focus"].values() if not math.isnan(v)]  # NaN: an all-zero heatmap
    assert focus and all(v == expected for v in focus), result["lesion_focus"]


def test_any_image_input_kind(analyzer, images):
    with Image.open(images[0]) as opened:
        rgb = opened.convert("RGB")
    encoded = io.BytesIO()
    rgb.save(encoded, format="PNG")
    kinds = (rgb, rgb.convert("L"), rgb.convert("RGBA"), np.asarray(rgb), torch.from_numpy(np.array(rgb)))
    for image in (*kinds, encoded.getvalue()):
        check_result(analyzer(image), rgb.size)
    with pytest.raises(ValueError, match="not-there.jpg"):
        analyzer("not-there.jpg")
    with pytest.raises(ValueError, match="empty"):
        analyzer([])
    with pytest.raises(ValueError, match="must be a SkinDualNet"):
        SkinLesionAnalyzer(analyzer.model.segmenter)


def test_analyzer_from_pretrained(saved_tiny_classifier, images, tmp_path):
    loaded = SkinLesionAnalyzer.from_pretrained(saved_tiny_classifier)
    expected = SkinLesionAnalyzer(tiny_classifier())(str(images[1]))
    assert loaded(str(images[1]))["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)
    loaded.model.segmenter.save_pretrained(tmp_path / "segmenter")
    with pytest.raises(ValueError, match="must be a SkinDualNet.*skinlesion_segmenter"):
        SkinLesionAnalyzer.from_pretrained(tmp_path / "segmenter")


# --------------------------------------------------------------------------------------------------------------------
# The transformers pipeline
# --------------------------------------------------------------------------------------------------------------------
def test_pipeline_task_in_process(model, images):
    analyse = pipeline(TASK, model=model, image_processor=SkinLesionImageProcessor.from_model_config(model.config))
    assert isinstance(analyse, SkinLesionAnalysisPipeline)
    single = analyse(str(images[0]), metadata={"age": 30, "site": "face"}, target_class="nv")
    with Image.open(images[0]) as image:
        check_result(single, image.size)
    assert single["target_label"] == "nv" and single["metadata_used"] == {"age": 30.0, "site": "head/neck"}
    inputs = [str(images[0]), {"image": str(images[2]), "metadata": {"sex": "female"}, "target_class": "df"}]
    alone = analyse(str(images[0]))
    for batch_size in (1, 2):
        first, second = analyse(inputs, batch_size=batch_size)
        assert first["probabilities"] == pytest.approx(alone["probabilities"], abs=1e-5)
        assert second["metadata_used"] == {"sex": "female"} and second["target_label"] == "df"
    # transformers' own machinery: a generator streams its results.
    streamed = list(analyse((path for path in [str(images[0])] * 2), batch_size=2))
    assert [r["probabilities"] == pytest.approx(alone["probabilities"], abs=1e-5) for r in streamed] == [True] * 2
    assert set(analyse(str(images[0]), method="layercam", explain=True)["heatmaps"]) == {"image", "lesion"}
    assert analyse(str(images[0]), explain=False)["heatmaps"] == {}
    with pytest.raises(ValueError, match="Unknown argument"):
        analyse(str(images[0]), top_k=3)
    with pytest.raises(ValueError, match="the labels are"):
        analyse(str(images[0]), target_class="melanoma")
    with pytest.raises(ValueError, match="'target_class': ..."):
        analyse([str(images[0])] * 2, target_class=["mel", "nv"])
    with pytest.raises(ValueError, match="'image' key"):
        analyse({"picture": str(images[0])})
    with pytest.raises(ValueError, match="grad_cam_backend.get_explainer"):
        analyse(str(images[0]), method="scorecam")


def test_pipeline_takes_an_explainer_object(model, images):
    """The package-only pytorch-grad-cam backend reaches the (remote-code) pipeline as an object."""
    analyse = pipeline(TASK, model=model, explainer=SkinDualNetLibraryCAM("gradcam"), clean_masks=True)
    library = analyse(str(images[0]), target_class="bkl")
    fast = analyse(str(images[0]), target_class="bkl", method="gradcam")
    for branch in ("image", "lesion"):
        assert np.abs(fast["heatmaps"][branch] - library["heatmaps"][branch]).max() < 0.05
    assert np.abs(fast["heatmaps"]["image"] - library["heatmaps"]["image"]).max() > 0  # two different backends ran


def test_save_for_hub_writes_auto_map_and_custom_pipeline(saved_tiny_classifier):
    assert not any(path.is_dir() for path in saved_tiny_classifier.iterdir())
    config = json.loads((saved_tiny_classifier / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_skinlesion.SkinDualNetConfig",
        "AutoModel": "modeling_skinlesion.SkinDualNet",
        "AutoModelForImageClassification": "modeling_skinlesion.SkinDualNet",
    }
    assert config["custom_pipelines"][TASK]["impl"] == "pipeline_skinlesion.SkinLesionAnalysisPipeline"
    assert config["custom_pipelines"][TASK]["pt"] == ["AutoModelForImageClassification"]
    processor = json.loads((saved_tiny_classifier / "preprocessor_config.json").read_text())
    assert processor["auto_map"] == {"AutoImageProcessor": "image_processing_skinlesion.SkinLesionImageProcessor"}


@pytest.mark.slow
def test_pipeline_loads_through_remote_code_only(saved_tiny_classifier, images, tmp_path):
    output = run_isolated(
        f"""
        import json, math, sys
        from transformers import pipeline

        analyse = pipeline("{TASK}", model={str(saved_tiny_classifier)!r}, trust_remote_code=True)
        result = analyse({str(images[2])!r}, metadata={{"age": 52, "sex": "male", "site": "back"}})
        batch = analyse([{str(images[0])!r}, {str(images[1])!r}], batch_size=2)
        print(json.dumps({{
            "pipeline": type(analyse).__module__,
            "model": type(analyse.model).__module__,
            "probabilities": result["probabilities"],
            "mask": list(result["mask"].shape),
            "mask_fraction": result["mask_fraction"],
            "heatmaps": {{k: [list(v.shape), float(v.mean())] for k, v in result["heatmaps"].items()}},
            "overlays": {{k: list(v.size) for k, v in result["heatmap_overlays"].items()}},
            "lesion_image": list(result["lesion_image"].size),
            "focus": {{k: (None if math.isnan(v) else v) for k, v in result["lesion_focus"].items()}},
            "metadata_used": result["metadata_used"],
            "batch": [r["probabilities"] for r in batch],
            "ours_loaded": any(m.split(".")[0] == "modeling_skinlesion" for m in sys.modules),
        }}))
        """,
        tmp_path,
    )
    found = json.loads(output.strip().splitlines()[-1])
    assert found["pipeline"].startswith("transformers_modules.") and found["pipeline"].endswith("pipeline_skinlesion")
    assert found["model"].startswith("transformers_modules.") and not found["ours_loaded"]
    analyse = SkinLesionAnalyzer.from_pretrained(saved_tiny_classifier).pipeline  # the same folder, our package's code
    expected = analyse(str(images[2]), metadata={"age": 52, "sex": "male", "site": "back"})
    with Image.open(images[2]) as image:
        width, height = image.size
    assert found["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)
    assert found["mask"] == [height, width] and found["mask_fraction"] == pytest.approx(expected["mask_fraction"])
    assert found["heatmaps"] == {
        branch: [[height, width], pytest.approx(float(heatmap.mean()), abs=1e-5)]
        for branch, heatmap in expected["heatmaps"].items()
    }
    assert found["overlays"] == {"image": [width, height], "lesion": [width, height]}
    assert found["lesion_image"] == [64, 64]
    for branch, value in expected["lesion_focus"].items():
        assert found["focus"][branch] == (None if math.isnan(value) else pytest.approx(value, abs=1e-4))
    assert found["metadata_used"] == {"age": 52.0, "sex": "male", "site": "posterior torso"}
    for got, path in zip(found["batch"], images[:2]):
        assert got == pytest.approx(analyse(str(path))["probabilities"], abs=1e-5)
