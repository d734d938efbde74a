"""When not to trust the model: the out-of-distribution gate and the referral operating point.

Unit checks on a tiny model (the Mahalanobis score against a hand computation, save / load, a checkpoint that lacks
the gate's statistics, the referral threshold, the risk-coverage curve, the OpenOOD metrics), then the shipped release
checkpoint on real data through `pipeline("skin-lesion-analysis")`: test-split images pass the gate at the stated
rate, synthetic non-dermoscopic images are refused, and the referral threshold reproduces its stored validation
sensitivity and specificity."""

import json

import numpy as np
import pytest
import torch
from conftest import CHECKPOINT, REPO_ROOT, tiny_classifier
from PIL import Image, ImageDraw, ImageFilter

from modeling_skinlesion import SkinDualNet
from modeling_skinlesion.trust import (
    fit_mahalanobis,
    fit_ood_gate,
    fit_referral,
    mahalanobis_score,
    ood_metrics,
    referral_point,
    risk_coverage,
)

SPLITS = REPO_ROOT / "docs" / "release-runs" / "classifier-splits.json"


def test_mahalanobis_score_matches_a_hand_computation():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 5, generator=generator) * torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    labels = torch.arange(200) % 3
    features[labels == 1] += 4.0
    means, whitening = fit_mahalanobis(features, labels, 3, shrinkage=0.0)
    x = features.double().numpy()
    class_means = np.stack([x[labels.numpy() == k].mean(0) for k in range(3)])
    centred = x - class_means[labels.numpy()]
    precision = np.linalg.inv(centred.T @ centred / len(x))
    queries = torch.randn(7, 5, generator=generator) * 3
    q = queries.double().numpy()
    expected = np.min([np.einsum("nd,de,ne->n", q - m, precision, q - m) for m in class_means], axis=0)
    np.testing.assert_allclose(mahalanobis_score(queries, means, whitening).numpy(), expected, rtol=1e-4)


def gated_tiny_model():
    model = tiny_classifier()
    dim = model.ood_feature_dim()
    generator = torch.Generator().manual_seed(1)
    fit_ood_gate(
        model,
        torch.randn(120, dim, generator=generator),
        torch.arange(120) % model.config.num_labels,
        torch.randn(40, dim, generator=generator),
        accept_rate=0.9,
        fitted_on="random features",
    )
    return model


def test_gate_is_in_the_forward_and_survives_save_and_load(tmp_path):
    model = gated_tiny_model()
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        output = model(pixel_values=pixel_values)
    fused = torch.cat([output.image_embeds, output.lesion_embeds], -1)
    expected = mahalanobis_score(fused, model.ood_gate.means, model.ood_gate.whitening)
    torch.testing.assert_close(output.ood_score, expected)
    assert output.in_distribution.tolist() == (expected <= model.config.ood_threshold).tolist()
    model.save_pretrained(tmp_path)
    loaded = SkinDualNet.from_pretrained(tmp_path).eval()
    assert loaded.config.ood_threshold == model.config.ood_threshold
    with torch.inference_mode():
        again = loaded(pixel_values=pixel_values)
    torch.testing.assert_close(again.ood_score, output.ood_score)


def test_a_checkpoint_without_the_gate_statistics_trusts_nothing(tmp_path):
    """A config that names a gate whose buffers the weights lack: NaN scores, every image flagged (not zeros, which
    would pass everything)."""
    from safetensors.torch import load_file, save_file

    model = gated_tiny_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("ood_gate.")}, tmp_path / "model.safetensors")
    loaded = SkinDualNet.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        output = loaded(pixel_values=torch.randn(2, 3, 64, 64))
    assert torch.isnan(output.ood_score).all()
    assert not output.in_distribution.any()


def test_a_model_without_a_gate_returns_none_and_still_scores_malignancy():
    model = tiny_classifier()
    with torch.inference_mode():
        output = model(pixel_values=torch.randn(2, 3, 64, 64))
    assert output.ood_score is None and output.in_distribution is None and output.refer is None
    malignant = [model.config.label2id[name] for name in ("mel", "bcc", "akiec")]
    assert sorted(model.config.malignant_labels) == ["akiec", "bcc", "mel"]
    torch.testing.assert_close(output.malignancy_score, output.logits.softmax(-1)[:, malignant].sum(-1))


def test_referral_point_and_fit():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    malignant = np.array([1, 0, 1, 0, 1, 0, 0, 1, 0, 0], dtype=bool)
    point = referral_point(scores, malignant, 0.75)  # 3 of the 4 malignant cases: threshold at the 3rd, 0.5
    assert point["threshold"] == 0.5
    assert point["sensitivity"] == 0.75 and point["specificity"] == pytest.approx(4 / 6)
    model = tiny_classifier()
    probabilities = np.full((4, 7), 0.01)
    probabilities[:, 5] = [0.9, 0.2, 0.5, 0.94]  # nv
    probabilities[:, 4] = 1 - probabilities.sum(1) + probabilities[:, 4]  # mel gets the rest
    labels = np.array([5, 4, 4, 5])
    report = fit_referral(model, probabilities, labels, sensitivity=1.0, fitted_on="four cases")
    assert model.config.referral_threshold == pytest.approx(probabilities[2, [0, 1, 4]].sum())
    assert report["sensitivity"] == 1.0 and report["specificity"] == 1.0
    with pytest.raises(ValueError, match="both malignant and benign"):
        referral_point(scores, np.ones(10, dtype=bool), 0.9)


def test_risk_coverage_and_ood_metrics_by_hand():
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])  # the two most confident: one right, one wrong
    curve = risk_coverage(probabilities, labels, steps=2)
    assert curve["coverage"] == [0.5, 1.0]
    assert curve["error"] == [0.5, 0.5] and curve["balanced_error"] == [0.5, 0.5]
    metrics = ood_metrics(np.array([0.0, 1.0, 2.0, 3.0]), np.array([2.5, 10.0]))
    assert metrics["auroc"] == pytest.approx((3 + 4) / 8)  # 2.5 beats three of four, 10 beats all
    assert metrics["fpr_at_95_tpr"] == 0.5  # threshold at the 95th percentile of in (2.85): 2.5 accepted


# --------------------------------------------------------------------------------------------------------------------
# The shipped checkpoint on real data
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def analyse():
    from transformers import pipeline

    return pipeline("skin-lesion-analysis", model=str(CHECKPOINT), trust_remote_code=True)


def split_rows(data_root, split: str):
    from modeling_skinlesion.data import column_values, load_ham10000

    wanted = set(json.loads(SPLITS.read_text())[split])
    dataset = load_ham10000(data_root / "ham10000", masks=False)
    return dataset.select([i for i, x in enumerate(column_values(dataset, "image_id")) if x in wanted])


def run_split(analyse, rows) -> list[dict]:
    inputs = [
        {"image": row["image"], "metadata": {"age": row["age"], "sex": row["sex"], "site": row["site"]}}
        for row in rows
    ]
    return analyse(inputs, explain=False, batch_size=32)


def test_shipped_checkpoint_has_a_fitted_gate_and_referral_point():
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["ood_feature"] == "fused" and config["ood_threshold"] > 0
    assert "train split" in config["ood_fitted_on"]
    assert config["malignant_labels"] == ["akiec", "bcc", "mel"]
    assert config["referral_sensitivity"] >= config["referral_target_sensitivity"] == 0.9
    metrics = json.loads((CHECKPOINT / "metrics.json").read_text())
    assert np.isfinite(metrics["selective_prediction"]["aurc_balanced_error"])
    assert (CHECKPOINT / metrics["selective_prediction"]["figure"]).is_file()


@pytest.mark.slow
def test_test_split_passes_the_gate_at_the_stated_rate(analyse, data_root):
    rows = split_rows(data_root, "test")
    results = run_split(analyse, rows)
    accepted = np.mean([result["in_distribution"] for result in results])
    stated = json.loads((CHECKPOINT / "metrics.json").read_text())["ood_gate"]["test"]["accepted"]
    assert accepted >= 0.95
    assert accepted == pytest.approx(stated, abs=1e-9)  # the report's figure is what the pipeline gives
    assert all(isinstance(result["ood_score"], float) for result in results)


@pytest.mark.slow
def test_referral_threshold_reproduces_its_validation_sensitivity(analyse, data_root):
    rows = split_rows(data_root, "validation")
    results = run_split(analyse, rows)
    config = analyse.model.config
    names = rows.features["label"].names
    truth = np.array([names[label] in config.malignant_labels for label in rows["label"]])
    refer = np.array([result["refer"] for result in results])
    scores = np.array([result["malignancy_score"] for result in results])
    assert (refer == (scores >= config.referral_threshold)).all()
    # float16 storage of the weights moves the scores by ~1e-4: the rates agree to one or two cases of 850.
    assert refer[truth].mean() == pytest.approx(config.referral_sensitivity, abs=2 / truth.sum())
    assert (~refer[~truth]).mean() == pytest.approx(config.referral_specificity, abs=2 / (~truth).sum())
    assert refer[truth].mean() >= 0.88


def text_page(size: int | None) -> Image.Image:
    """A white page of black text: DejaVu Sans at `size` px (matplotlib's copy), or PIL's 11-px bitmap font."""
    from matplotlib import font_manager
    from PIL import ImageFont

    font = None
    if size is not None:
        font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    text = Image.new("RGB", (600, 400), "white")
    draw = ImageDraw.Draw(text)
    for row in range(10):
        draw.text((15, 15 + 35 * row), "Invoice 2026-12: total due, please pay by Friday", fill="black", font=font)
    return text


def synthetic_ood_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    text = text_page(24)
    noise = Image.fromarray(rng.integers(0, 256, size=(300, 300, 3), dtype=np.uint8))
    return {
        "uniform noise": noise,
        "smooth noise": noise.resize((20, 20)).resize((400, 400), Image.Resampling.BICUBIC),
        "flat grey": Image.new("RGB", (300, 300), (128, 128, 128)),
        "flat skin tone": Image.new("RGB", (300, 300), (224, 172, 138)),
        "rendered text": text,
        "blurred text": text.filter(ImageFilter.GaussianBlur(20)),
    }


def test_synthetic_non_dermoscopic_images_are_refused(analyse):
    images = synthetic_ood_images()
    results = analyse(list(images.values()), explain=False)
    refused = {name: not result["in_distribution"] for name, result in zip(images, results)}
    assert all(refused.values()), refused
    threshold = analyse.model.config.ood_threshold
    assert all(result["ood_score"] > threshold for result in results)


@pytest.mark.xfail(
    strict=True, reason="known miss: a white page of PIL's 11-px bitmap text scores just under the gate"
)
def test_tiny_bitmap_text_is_refused(analyse):
    """Recorded in docs/results.md: this page scores 486.9 against the threshold 491.1 (the same page in 24-px
    DejaVu Sans scores 901.6 and is refused). strict: the day the gate refuses it, this test says so."""
    assert not analyse(text_page(None), explain=False)["in_distribution"]


def test_fine_tuning_marks_the_gate_and_referral_inherited_or_drops_them(tmp_path):
    """scripts/_finetuning.build_model: the same classes keep the base's gate and referral point, marked "inherited"
    (the card and the config say so); a new head drops them (their class means and malignant classes were the old
    ones), and the card then says the model has no gate."""
    import sys

    from conftest import SCRIPTS

    from modeling_skinlesion.model_card import render_model_card

    sys.path.insert(0, str(SCRIPTS))
    from modeling_skinlesion.training import finetuning as _finetuning

    base = gated_tiny_model()
    fit_referral(base, np.eye(7)[[4, 5, 0, 5]] * 0.9 + 0.1 / 7, np.array([4, 5, 0, 5]), fitted_on="four cases")
    base.save_pretrained(tmp_path / "base")
    labels = [base.config.id2label[i] for i in range(7)]
    same = _finetuning.build_model(str(tmp_path / "base"), base, labels, {n: [n] for n in labels}, None)
    assert same.config.ood_fitted_on.startswith("inherited from") and same.ood_gate is not None
    assert same.config.referral_fitted_on.startswith("inherited from")
    assert "inherited from" in str(render_model_card(same.config))
    other = SkinDualNet.from_pretrained(tmp_path / "base")
    clinic = _finetuning.build_model(
        str(tmp_path / "base"), other, ["nv", "mel"], {"nv": ["nv"], "mel": ["mel"]}, None
    )
    assert clinic.ood_gate is None and clinic.config.referral_threshold is None
    assert clinic.config.malignant_labels == ["mel"]
    with torch.inference_mode():
        output = clinic(pixel_values=torch.randn(1, 3, 64, 64))
    assert output.ood_score is None and output.malignancy_score is not None
    assert "No out-of-distribution gate" in str(render_model_card(clinic.config))
