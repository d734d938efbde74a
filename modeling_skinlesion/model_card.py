"""Model cards (Hub `README.md`) for skin-dualnet checkpoints, shared by the training, fine-tuning and export scripts.

The card states what the weights were trained on and what that implies: weights trained on HAM10000 or ISIC data
(CC BY-NC 4.0) are themselves for non-commercial use, and the model is research software, not a medical device.
"""

import json
import re
from collections.abc import Iterable, Mapping
from numbers import Number
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

DEFAULT_REPO_ID = "org/skin-dualnet"
NON_COMMERCIAL_LICENSE = "cc-by-nc-4.0"
COUNT_KEYS = ("num_samples", "num_images")
BEFORE_KEYS = ("accuracy", "balanced_accuracy", "macro_auc", "ece")

PAPER_CITATION = """@article{atiq2025explainable,
  title   = {Towards Explainable Skin Cancer Classification: A Dual-Network Attention Model with Lesion Segmentation
             and Clinical Metadata Fusion},
  author  = {Atiq, Md Enamul and Fattah, Shaikh Anowarul},
  journal = {arXiv preprint arXiv:2510.17773},
  year    = {2025}
}"""

# Known training sets: display name, Hub `datasets:` tag, licence terms, whether they restrict commercial use, and
# the reference to cite. Keys are matched on a normalised prefix ("HAM10000" -> "ham10000", "ISIC 2018" -> "isic2018").
KNOWN_DATASETS: dict[str, dict[str, Any]] = {
    "ham10000": {
        "name": "HAM10000",
        "tag": "HAM10000",
        "terms": "CC BY-NC 4.0 (Harvard Dataverse, doi:10.7910/DVN/DBW86T)",
        "non_commercial": True,
        "citation": """@article{tschandl2018ham10000,
  title   = {The HAM10000 dataset, a large collection of multi-source dermatoscopic images of common pigmented skin
             lesions},
  author  = {Tschandl, Philipp and Rosendahl, Cliff and Kittler, Harald},
  journal = {Scientific Data},
  volume  = {5},
  pages   = {180161},
  year    = {2018}
}""",
    },
    "isic2017": {
        "name": "ISIC 2017 (Task 1 masks, Part 3 labels)",
        "tag": "ISIC-2017",
        "terms": "images CC0 1.0; challenge ground truth for research use",
        "non_commercial": True,
        "citation": """@inproceedings{codella2018isic2017,
  title     = {Skin Lesion Analysis Toward Melanoma Detection: A Challenge at the 2017 International Symposium on
               Biomedical Imaging (ISBI), Hosted by the International Skin Imaging Collaboration (ISIC)},
  author    = {Codella, Noel and Gutman, David and Celebi, M. Emre and others},
  booktitle = {ISBI},
  note      = {arXiv:1710.05006},
  year      = {2018}
}""",
    },
    "isic2018": {
        "name": "ISIC 2018 (Task 1 lesion boundaries / Task 3 classes)",
        "tag": "ISIC-2018",
        "terms": "CC BY-NC 4.0",
        "non_commercial": True,
        "citation": """@article{codella2019isic2018,
  title   = {Skin Lesion Analysis Toward Melanoma Detection 2018: A Challenge Hosted by the International Skin
             Imaging Collaboration (ISIC)},
  author  = {Codella, Noel and Rotemberg, Veronica and Tschandl, Philipp and others},
  journal = {arXiv preprint arXiv:1902.03368},
  year    = {2019}
}""",
    },
    "isic2019": {
        "name": "ISIC 2019",
        "tag": "ISIC-2019",
        "terms": "CC BY-NC 4.0",
        "non_commercial": True,
        "citation": """@article{combalia2019bcn20000,
  title   = {BCN20000: Dermoscopic Lesions in the Wild},
  author  = {Combalia, Marc and Codella, Noel and Rotemberg, Veronica and others},
  journal = {arXiv preprint arXiv:1908.02288},
  year    = {2019}
}""",
    },
}


def _dataset_key(name: str) -> str | None:
    normalised = re.sub(r"[^a-z0-9]", "", name.lower())
    for key in KNOWN_DATASETS:
        if normalised.startswith(key):
            return key
    return None


def load_metrics(path: str | Path) -> dict[str, Any]:
    """Read a metrics JSON (as written by `scripts/evaluate_model.py` or the training scripts), with a clear error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"Metrics file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"Metrics file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"Metrics file {path} must hold a JSON object, got {type(data).__name__}.")
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, Number) and not isinstance(value, bool)


def split_metrics(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """(context, metric values) of a metrics JSON in any of the shapes the scripts write:

    - `scripts/evaluate_model.py`: `{"dataset": ..., "split": ..., "num_samples": ..., "metrics": {...}}`;
    - the training scripts: `{"best": {"epoch": ..., "validation": {...}}, "args": {"dataset": [...]}, ...}`
      (`scripts/finetune.py` adds `eval_dataset`, the data the validation split came from, and `before`);
    - a flat dict of metric values.
    """
    if isinstance(metrics.get("metrics"), Mapping):
        context = {k: v for k, v in metrics.items() if k != "metrics" and not isinstance(v, (Mapping, list))}
        return context, metrics["metrics"]
    best = metrics.get("best")
    if isinstance(best, Mapping) and isinstance(best.get("validation"), Mapping):
        context: dict[str, Any] = {"split": "validation"}
        training_args = metrics.get("args") if isinstance(metrics.get("args"), Mapping) else {}
        if metrics.get("eval_dataset"):
            context["dataset"] = str(metrics["eval_dataset"])
        elif training_args.get("dataset"):
            context["dataset"] = ", ".join(map(str, training_args["dataset"]))
        for key in COUNT_KEYS:
            if _is_number(best["validation"].get(key)):
                context[key] = best["validation"][key]
        if isinstance(best.get("epoch"), int):
            context["best epoch"] = best["epoch"] + 1
        return context, best["validation"]
    return {}, metrics


def metrics_tables(metrics: Mapping[str, Any]) -> tuple[list[tuple[str, Number]], dict[str, dict[str, Any]]]:
    """Split a metrics JSON (see `split_metrics`) into (name, value) rows and per-class columns: entries named
    `per_class_<metric>` (dicts keyed by class) become per-class columns, other dicts of numbers are flattened as
    `parent/child`, counts (`num_samples`, `num_images`) belong to the context, and anything else (strings, lists) is
    left out."""
    _, values = split_metrics(metrics)
    rows: list[tuple[str, Number]] = []
    per_class: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if key in COUNT_KEYS:
            continue
        if _is_number(value):
            rows.append((key, value))
        elif isinstance(value, Mapping) and key.startswith("per_class_"):
            per_class[key.removeprefix("per_class_")] = dict(value)
        elif isinstance(value, Mapping):
            rows.extend((f"{key}/{k}", v) for k, v in value.items() if _is_number(v))
    return rows, per_class


def training_datasets(metrics: Mapping[str, Any]) -> list[str]:
    """The training sets recorded in a training run's metrics JSON (`args.dataset`; a Hub dataset's id instead of
    "hub"), or `[]`."""
    training_args = metrics.get("args")
    if not isinstance(training_args, Mapping) or not training_args.get("dataset"):
        return []
    roots = list(training_args.get("data_root") or [])
    names = list(training_args["dataset"])
    roots += [None] * (len(names) - len(roots))
    return [str(root) if name == "hub" and root else str(name) for name, root in zip(names, roots)]


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if _is_number(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)
    return str(value)


def _interval(metrics: Mapping[str, Any], key: str) -> str:
    low_high = (metrics.get("intervals_95") or {}).get(key)
    return f"[{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else "–"


def _table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    """A Markdown table: the header, its rule, and one line per row (numbers and None through `_format`)."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in rows:
        cells = [cell if isinstance(cell, str) else _format(cell) for cell in row]
        lines.append("|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|")
    return lines


def _release_section(metrics: Mapping[str, Any]) -> str:
    """The card section of a release report (`scripts/release_report.py`): test metrics with lesion-bootstrap
    intervals, per class, melanoma sensitivity, calibration, subgroups, segmenter and served masks, recipe."""
    lines = [
        f"Held-out **test split**: {metrics['test_images']} images of {metrics['test_lesions']} lesions, split by "
        "lesion (no lesion in two splits), never used for training, model selection or calibration. Every image went "
        f"through the path users get: {metrics['path']}. 95 % intervals: bootstrap over lesions "
        "(all images of a lesion resampled together), test-sampling noise only (one training seed).",
        "",
        "| metric | value | 95 % interval |",
        "| --- | --- | --- |",
    ]
    for key in ("balanced_accuracy", "macro_auc", "accuracy", "ece"):
        lines.append(f"| {key} | {_format(metrics[key])} | {_interval(metrics, key)} |")
    lines.append(
        f"| melanoma_sensitivity | {_format(metrics['melanoma_sensitivity'])} | "
        f"{_interval(metrics, 'melanoma_sensitivity')} |"
    )
    lines += [
        "",
        f"Melanoma at the default decision (the most probable class): sensitivity "
        f"{_format(metrics['melanoma_sensitivity'])}, specificity {_format(metrics['melanoma_specificity'])}. "
        f"Classes predicted on the test split: {', '.join(metrics['predicted_classes'])}.",
        "",
        "Per class (test):",
        "",
    ]
    lines += _table(
        ["class", "images", "sensitivity", "specificity", "AUC"],
        ([name, row["support"], row["sensitivity"], row["specificity"], row["auc"]]
         for name, row in metrics["per_class"].items()),
    )  # fmt: skip
    calibration = metrics.get("calibration") or {}
    if calibration:
        validation = calibration.get("validation") or {}
        lines += [
            "",
            f"**Calibration.** The model divides its logits by a temperature of {_format(calibration['temperature'])} "
            f"(`config.temperature`, fitted on the {calibration['fitted_on']}), so every entry point returns "
            f"calibrated probabilities. ECE on the test split: {_format(calibration['test_ece_before'])} before, "
            f"{_format(calibration['test_ece_after'])} after"
            + (
                f"; on the validation split: {_format(validation.get('ece_before'))} before, "
                f"{_format(validation.get('ece_after'))} after."
                if validation
                else "."
            ),
        ]
    subgroups = metrics.get("subgroups") or {}
    if subgroups:
        lines += [
            "",
            "**Subgroups** (test split; groups under 50 images or with one class are too small to judge; melanoma "
            "sensitivity only with 10 or more melanomas):",
            "",
        ]
        scores = ("accuracy", "balanced_accuracy", "macro_auc", "melanoma_sensitivity")
        lines += _table(
            ["field", "group", "images", "accuracy", "balanced accuracy", "macro AUC", "melanoma sensitivity"],
            ([field, group, row["images"], *(["too small to judge", "", "", ""] if row.get("too_small")
              else [row.get(key) for key in scores])]
             for field, groups in subgroups.items() for group, row in groups.items()),
        )  # fmt: skip
    segmenter = metrics.get("segmenter") or {}
    if segmenter:
        table = _table(
            ["test set", "images", "Dice", "Jaccard", "thresholded Jaccard (ISIC 2018)"],
            ([name, row.get("num_samples", row.get("images")), row["dice"], row["jaccard"], row["thresholded_jaccard"]]
             for name, row in segmenter.items()),
        )  # fmt: skip
        heading = "**Segmenter** (the nested Deep-UNet, its own lesion-grouped test split, masks cleaned and scored"
        lines += ["", heading + " at the original image size):", "", *table]
    served = metrics.get("served_masks_vs_reference") or {}
    if served:
        lines += [
            "",
            "Masks the analysis pipeline served for the classifier's test images, against the HAM10000 reference "
            "masks: " + ", ".join(f"{key} {_format(value)}" for key, value in served.items()) + ".",
        ]
    recipe = metrics.get("recipe") or []
    if recipe:
        lines += ["", "**Recipe** (2-core CPU, no GPU; wall time of each stage):", ""]
        lines += [f"- {stage['stage']}: `{stage['command']}` ({stage['wall_time_s']} s)" for stage in recipe]
    lines += [
        "",
        "These figures come from HAM10000 (and ISIC 2017 for the segmenter); they do not predict performance on "
        "another clinic's images, devices or patient population.",
    ]
    return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _trust_section(config: Any, metrics: Mapping[str, Any] | None) -> str:
    """ "When not to trust it": the out-of-distribution gate and the referral operating point stored in the config,
    with the release report's measurements when there are some (`scripts/release_report.py`)."""
    if config.model_type != "skin_dualnet":
        return ""
    metrics = metrics or {}
    lines = []
    if config.ood_feature is None:
        lines.append(
            "**No out-of-distribution gate**: this checkpoint cannot tell a dermoscopic image from anything else "
            "(`ood_score` and `in_distribution` are None); every image gets a diagnosis. Fit one with "
            "`scripts/fit_trust.py`."
        )
    if config.referral_threshold is None:
        lines += ["", "**No referral operating point** (`refer` is None): fit one with `scripts/fit_trust.py`."]
    if config.ood_feature is not None:
        gate = metrics.get("ood_gate") or {}
        lines += [
            f"**Out-of-distribution gate.** Every forward computes `ood_score`, the smallest squared Mahalanobis "
            f"distance of the image's `{config.ood_feature}` features to a class mean (class-conditional Gaussians "
            f"with a shared covariance, Lee et al. 2018), and "
            f"`in_distribution = ood_score <= {config.ood_threshold:.2f}`. "
            f"Fitted on: {config.ood_fitted_on or 'not recorded'}. When `in_distribution` is false the answer should "
            "not be trusted: the image does not look like the dermoscopic images the model was trained on.",
        ]
        if gate.get("test"):
            rows = [
                ["test split (in distribution)", gate["test"]["images"], _percent(gate["test"]["accepted"]), "", ""]
            ]
            if gate.get("isic2017"):
                isic = gate["isic2017"]
                rows.append(
                    ["ISIC 2017 (other centres and cameras: should pass)", isic["images"], _percent(isic["accepted"]),
                     isic["vs_test"]["auroc"], ""]
                )  # fmt: skip
            if gate.get("ood_set"):
                ood = gate["ood_set"]
                rows.append(
                    ["out-of-distribution set (should be refused)", ood["images"], _percent(1 - ood["refused"]),
                     ood["vs_test"]["auroc"], ood["vs_test"]["fpr_at_95_tpr"]]
                )  # fmt: skip
            lines += ["", *_table(["images", "count", "accepted", "AUROC vs test", "FPR at 95 % TPR"], rows)]
            if gate.get("ood_set"):
                by_category = gate["ood_set"]["by_category"]
                lines += [
                    "",
                    "The out-of-distribution set (`scripts/make_ood_set.py`; nothing of it was used to fit anything) "
                    "holds what a user could upload, refused per kind: "
                    + ", ".join(
                        f"{name} {_percent(row['refused'])} of {row['images']}" for name, row in by_category.items()
                    )
                    + ". OpenOOD convention: in-distribution positive, AUROC and FPR at 95 % TPR against the test "
                    "split.",
                ]
    if config.referral_threshold is not None:
        referral = metrics.get("referral") or {}
        lines += [
            "",
            f"**Referral operating point.** `malignancy_score` = the summed calibrated probability of "
            f"{', '.join(config.malignant_labels)}; `refer = malignancy_score >= {config.referral_threshold:.4f}`, "
            f"the threshold fixed on the {config.referral_fitted_on or 'validation split'} for sensitivity at least "
            f"{_format(config.referral_target_sensitivity)} on malignant lesions (there: sensitivity "
            f"{_format(config.referral_sensitivity)}, specificity {_format(config.referral_specificity)}).",
        ]
        test = referral.get("test")
        if test:
            intervals = referral.get("test_intervals_95") or {}

            def shown(key: str) -> str:
                low_high = intervals.get(key)
                return (
                    f"{_format(test.get(key))} [{low_high[0]:.3f}, {low_high[1]:.3f}]"
                    if low_high
                    else _format(test.get(key))
                )

            lines += [
                "",
                f"On the test split ({test['images']} images, {test['malignant_images']} malignant; 95 % "
                f"lesion-bootstrap intervals): sensitivity {shown('sensitivity')}, specificity "
                f"{shown('specificity')}, melanoma "
                f"sensitivity {shown('melanoma_sensitivity')}; {_percent(test['referred'])} of the images referred.",
            ]
    selective = metrics.get("selective_prediction")
    if selective:
        lines += [
            "",
            f"**Selective prediction** (test split): setting aside the least confident images (lowest maximum "
            f"probability) lowers the balanced error of the kept ones; area under the risk-coverage curve "
            f"{_format(selective['aurc_balanced_error'])} (balanced error), {_format(selective['aurc_error'])} "
            "(error).",
        ]
        if selective.get("figure"):
            lines += ["", f"![Risk-coverage curve on the test split]({selective['figure']})"]
    return "\n".join(lines) + "\n" if lines else ""


def _metrics_section(metrics: Mapping[str, Any] | None) -> str:
    if metrics and isinstance(metrics.get("per_class"), Mapping) and "subgroups" in metrics:
        return _release_section(metrics)
    if not metrics:
        return (
            "No evaluation results were supplied when this card was written. Evaluate the checkpoint on your own "
            "data with `scripts/evaluate_model.py` before relying on it.\n"
        )
    context_values, _ = split_metrics(metrics)
    context = [
        f"{key}: {_format(context_values[key])}"
        for key in ("dataset", "split", "num_samples", "num_images", "best epoch", "seed")
        if key in context_values
    ]
    rows, per_class = metrics_tables(metrics)
    lines = []
    if context:
        lines += ["Evaluated on " + "; ".join(context) + ".", ""]
    lines += ["| metric | value |", "| --- | --- |"] + [f"| {name} | {_format(value)} |" for name, value in rows]
    if per_class:
        classes = list(dict.fromkeys(label for column in per_class.values() for label in column))
        lines += ["", "Per class:", "", "| class | " + " | ".join(per_class) + " |"]
        lines += ["| --- " * (len(per_class) + 1) + "|"]
        for label in classes:
            cells = " | ".join(_format(column.get(label)) for column in per_class.values())
            lines.append(f"| {label} | {cells} |")
    before = metrics.get("before")
    if isinstance(before, Mapping):
        scores = ", ".join(f"{key} {_format(before[key])}" for key in BEFORE_KEYS if _is_number(before.get(key)))
        lines += [
            "",
            f"Before fine-tuning (the base checkpoint, its classes mapped onto these), on the same images: {scores}.",
        ]
        if metrics.get("kept_starting_model"):
            lines += [
                "",
                "No fine-tuning epoch beat the starting model on this validation split, so these weights are the "
                "starting model's (with the classes mapped as above).",
            ]
    before_test, after_test = metrics.get("before_test"), metrics.get("after_test")
    if isinstance(before_test, Mapping) and isinstance(after_test, Mapping):
        changes = ", ".join(
            f"{key} {_format(before_test[key])} -> {_format(after_test[key])}"
            for key in BEFORE_KEYS
            if _is_number(before_test.get(key)) and _is_number(after_test.get(key))
        )
        lines += [
            "",
            f"On the clinic's test split ({after_test.get('num_samples', '?')} images, which chose neither the epoch "
            f"nor the calibration), before -> after fine-tuning: {changes}.",
        ]
    lines += [
        "",
        "These figures come from the data named above; they do not predict performance on another clinic's "
        "images, devices or patient population.",
    ]
    return "\n".join(lines) + "\n"


def _description(config: Any) -> tuple[str, str]:
    """(pipeline tag, model description) from a `SkinDualNetConfig` or `SkinLesionSegmenterConfig`."""
    if config.model_type == "skin_dualnet":
        segmenter = config.segmenter_config
        branches = ["an encoder on the dermoscopic image"]
        if config.use_lesion_branch:
            branches.append(
                "a second encoder on the lesion image cut out with the segmenter's mask "
                f"(`lesion_mode={config.lesion_mode!r}`), fused with the first by bidirectional multi-head "
                "cross-attention"
            )
        if config.use_metadata:
            branches.append("a transformer over patient metadata (age, sex, anatomical site)")
        labels = ", ".join(f"`{config.id2label[i]}`" for i in sorted(config.id2label))
        return "image-classification", (
            "A dual-encoder skin-lesion classifier after Atiq & Fattah (arXiv 2510.17773). One checkpoint holds the "
            f"whole system: a Deep-UNet lesion segmenter (`{segmenter.encoder_name}` encoder, ASPP bottleneck, "
            f"decoder with Dual Attention Gates, {segmenter.image_size} px), and a classifier with "
            + "; ".join(branches)
            + f". Both branch encoders are `{config.encoder_name}` at {config.image_size} px.\n\n"
            f"Classes ({config.num_labels}): {labels}.\n"
        )
    return "image-segmentation", (
        "The Deep-UNet lesion segmenter of skin-dualnet (Atiq & Fattah, arXiv 2510.17773): a "
        f"`{config.encoder_name}` encoder tapped at five stages, an ASPP bottleneck, and a decoder whose skip "
        f"connections pass through Dual Attention Gates. It outputs one lesion logit per pixel at "
        f"{config.image_size} px; `post_process_masks` of the image processor turns them into clean binary masks "
        "at the original image size.\n"
    )


def _usage(config: Any, repo_id: str) -> str:
    if config.model_type == "skin_dualnet":
        return f"""```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = processor(Image.open("lesion.jpg"))
# Metadata is optional: NaN age and index 0 ("unknown") are the missing values.
metadata = {{
    "age": torch.tensor([55.0]),
    "sex_ids": torch.tensor([model.config.sex_vocab.index("female")]),
    "site_ids": torch.tensor([model.config.site_vocab.index("posterior torso")]),
}}
with torch.no_grad():
    outputs = model(**inputs, **metadata)
probabilities = outputs.logits.softmax(-1)[0]
print({{model.config.id2label[i]: round(p.item(), 3) for i, p in enumerate(probabilities)}})
```

`outputs.lesion_mask` is the mask the lesion branch used and `outputs.mask_empty` flags images where the segmenter
found no lesion (the lesion branch then saw the whole image).
"""
    return f"""```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
image = Image.open("lesion.jpg")
with torch.no_grad():
    logits = model(**processor(image)).logits
mask = processor.post_process_masks(logits, target_sizes=[(image.height, image.width)])[0]  # boolean (h, w)
```
"""


def _when_not_to_trust(config: Any, metrics: Mapping[str, Any] | None) -> str:
    section = _trust_section(config, metrics)
    return f"## When not to trust it\n\n{section}\n" if section else ""


def render_model_card(
    config: Any,
    repo_id: str = DEFAULT_REPO_ID,
    datasets: Iterable[str] = (),
    metrics: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    training: Mapping[str, Any] | None = None,
    license: str | None = None,
) -> ModelCard:
    """Build the model card of a checkpoint.

    Args:
        config: the model's `SkinDualNetConfig` or `SkinLesionSegmenterConfig`.
        repo_id: Hub repository the card describes (used in the usage snippet).
        datasets: names of the training sets ("HAM10000", "isic2018", "my-clinic", ...). Known public sets are
            described, cited and decide the licence; other names are listed as given.
        metrics: a metrics dict (e.g. the JSON written by `scripts/evaluate_model.py`) rendered as tables.
        base_model: the checkpoint this one was fine-tuned from, if any.
        training: free-form training facts (preset, epochs, split, wall time) listed under "Training data".
        license: licence identifier; by default `cc-by-nc-4.0` when any known training set is non-commercial,
            else `other`.
    """
    if config.model_type not in ("skin_dualnet", "skinlesion_segmenter"):
        raise ValueError(
            f"`config` must be a SkinDualNetConfig or SkinLesionSegmenterConfig, got model_type {config.model_type!r}."
        )
    names = [str(name) for name in datasets]
    known = {key: KNOWN_DATASETS[key] for key in dict.fromkeys(k for k in map(_dataset_key, names) if k)}
    others = [name for name in names if _dataset_key(name) is None]
    non_commercial = any(info["non_commercial"] for info in known.values())
    if license is None:
        license = NON_COMMERCIAL_LICENSE if non_commercial else "other"
    pipeline_tag, description = _description(config)
    tags = ["skin-lesion", "dermoscopy", "medical-imaging", "custom_code", pipeline_tag]
    if config.model_type == "skin_dualnet":
        tags += ["grad-cam", "metadata-fusion"]
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=tags,
        datasets=[info["tag"] for info in known.values()] + others or None,
        base_model=base_model,
    )

    data_lines = [f"- **{info['name']}**: {info['terms']}." for info in known.values()]
    data_lines += [f"- **{name}** (user-supplied data; its licence is the data owner's)." for name in others]
    if not data_lines:
        data_lines = ["- Not recorded when this card was written."]
    if base_model:
        data_lines.append(f"- Fine-tuned from [`{base_model}`](https://huggingface.co/{base_model}).")
    if training:
        data_lines += [f"- {key}: {_format(value)}" for key, value in training.items()]

    if non_commercial or license == NON_COMMERCIAL_LICENSE:
        licence_text = (
            "These weights were trained on data released under non-commercial terms (CC BY-NC 4.0, or research "
            "use only for challenge ground truth), so they are released under **CC BY-NC 4.0: non-commercial use "
            "only**. The code that defines the model is Apache-2.0."
        )
    else:
        licence_text = (
            f"Licence: `{license}`. Check that the terms of every training set allow the use you intend. The code "
            "that defines the model is Apache-2.0."
        )
        if base_model:
            licence_text += (
                f" These weights start from `{base_model}`: its licence (CC BY-NC 4.0 if it was trained on HAM10000 "
                "or ISIC data) applies to them too."
            )
    citations = "\n\n".join([PAPER_CITATION] + [info["citation"] for info in known.values()])
    body = f"""
# {repo_id.split("/")[-1]}

> **Research software, not a medical device.** This model has not been cleared or approved by any regulator and
> must not be used to diagnose, treat or triage patients.

## Model description

{description}
## How to use

The modelling code ships with the checkpoint (`trust_remote_code=True`); the weights load with `transformers` alone.

{_usage(config, repo_id)}
## Training data

{chr(10).join(data_lines)}

## Evaluation

{_metrics_section(metrics)}
{_when_not_to_trust(config, metrics)}## Intended use

Research on automated dermoscopic image analysis: benchmarking, reproducing the paper, studying explanations
(Grad-CAM on both branches) and fine-tuning on a clinic's own data (`scripts/finetune.py`). Outputs are to be read by
researchers, not used to make decisions about individual patients.

## Limitations

- Trained on dermoscopic images from a few centres; clinical (non-dermoscopic) photographs, other devices and
  populations are out of distribution and accuracy may drop sharply without warning.
- Public skin-lesion datasets over-represent light skin types; performance on darker skin is largely untested.
- Classes are imbalanced (nevi dominate); rare classes have fewer examples and less reliable scores.
- The classifier can only answer with the classes above; a lesion of another kind still gets one of them.
- Metadata (age, sex, site) shifts predictions; missing fields are handled, but wrong fields mislead.
- Probabilities are calibrated (temperature scaling) only where a temperature was fitted, and only for data like the
  split it was fitted on; they are not risk estimates for an individual patient.

## Licence

{licence_text}

## Citation

```bibtex
{citations}
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def write_model_card(folder: str | Path, config: Any, **kwargs: Any) -> Path:
    """Render the card (see `render_model_card`) into `folder/README.md`; returns its path."""
    path = Path(folder) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    render_model_card(config, **kwargs).save(path)
    return path


__all__ = [
    "DEFAULT_REPO_ID",
    "KNOWN_DATASETS",
    "load_metrics",
    "metrics_tables",
    "render_model_card",
    "split_metrics",
    "training_datasets",
    "write_model_card",
]
