"""skin-dualnet research demo: lesion mask, class probabilities and Grad-CAM for both branches.

The model comes from `SKIN_DUALNET_MODEL` (a Hub id or a local folder); by default the release checkpoint shipped in
the repository (`checkpoints/skin-dualnet-small`) when the app runs from a clone, else the Hub repo `org/skin-dualnet`
(the id the release is published under). It is loaded once per process through its remote code
(`trust_remote_code=True`), so the Space needs no copy of this project's package: the model repo's
"skin-lesion-analysis" pipeline reads the image (its one image reader) and the patient metadata (its one metadata
parser); this file only checks an upload's declared size first and lays out the page.

    SKIN_DUALNET_MODEL=outputs/demo-model python space/app.py --port 7860

`predict(image, age, sex, site)` is a plain function (testable without a server); `build()` returns the `gr.Blocks`
page; `launch()` runs only under `__main__`.
"""

from __future__ import annotations  # annotations name gradio types, imported only on first use

import argparse
import csv
import importlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class _OnFirstUse:
    """A module imported on its first attribute access: gradio costs several seconds of imports, which `--help` and a
    usage error do not need."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        module = importlib.import_module(self._name)
        globals()["gr"] = module  # later lookups go straight to the module
        return getattr(module, attribute)


gr = _OnFirstUse("gradio")

logger = logging.getLogger("skin_dualnet_space")

MODEL_ENV = "SKIN_DUALNET_MODEL"
DEFAULT_MODEL = "org/skin-dualnet"
REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO_ROOT / "checkpoints" / "skin-dualnet-small"
TASK = "skin-lesion-analysis"
# Dermoscopy images are at most ~25 MP; anything far larger is refused from its header, before it is decoded. PIL
# itself refuses (DecompressionBombError) above twice this limit, whatever reads the file.
MAX_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
MIN_SIDE = 32
MAX_FILE_SIZE = "10mb"
CONCURRENCY_LIMIT = 2
# Requests waiting beyond the ones running: a burst of up to this many visitors is queued (each sees their place in
# the queue); the next ones are refused with gradio's "Queue is full" message.
QUEUE_SIZE = 128
TOP_K = 5
DISPLAY_SIDE = 256
PANEL_HEIGHT = 300  # every image panel the same size, the lesion image's included
OUTPUT_IMAGES = ("mask_overlay", "lesion_image", "gradcam_image_branch", "gradcam_lesion_branch")
OUTPUT_MAX_AGE_S = 600
UNKNOWN = "unknown"
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
# An absolute path in a message (the server's upload folder, the model folder); users see only its last part.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/(?:[^\s'\"/:]+/)+([^\s'\"/:]+)")

DISCLAIMER = (
    "## ⚠️ Research demo — not a medical device\n"
    "This page shows what a research model computes. It has not been cleared or approved by any regulator, its "
    "output can be wrong in ways that matter, and it must not be used to diagnose, treat, triage or reassure anyone. "
    "If you are worried about a skin lesion, see a doctor."
)
CSS = """
/* The examples table shows every column in full, wrapping long values instead of cutting them; on a phone it
   shrinks (smaller thumbnails and padding) to fit the screen, and scrolls sideways, rather than cut, if it cannot. */
#examples .table-wrap { overflow-x: auto; }
#examples table { width: 100%; }
#examples td, #examples th { white-space: normal !important; overflow: visible !important;
  text-overflow: clip !important; max-width: none !important; overflow-wrap: break-word; }
@media (max-width: 640px) {
  #examples td, #examples th { padding: 4px !important; }
  #examples td.image .container { width: 48px !important; height: 48px !important; }
}
/* Block labels wrap on narrow screens rather than being cut. */
[data-testid="block-label"] { white-space: normal; overflow-wrap: anywhere; }
"""


# --------------------------------------------------------------------------------------------------------------------
# Model loading (once per process and source)
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """The analysis pipeline of one model source, or the reason it could not be loaded."""

    source: str
    pipeline: Any = None
    error: str | None = None
    labels: list[str] = field(default_factory=list)
    sex_choices: list[str] = field(default_factory=lambda: [UNKNOWN])
    site_choices: list[str] = field(default_factory=lambda: [UNKNOWN])
    training_data: str = "unknown"
    test_summary: str = ""

    @property
    def ok(self) -> bool:
        return self.pipeline is not None

    @property
    def name(self) -> str:
        return display_name(self.source)


_MODELS: dict[str, LoadedModel] = {}
_MODELS_LOCK = threading.Lock()


def model_source(source: str | None = None) -> str:
    """The model to serve: `source`, else `$SKIN_DUALNET_MODEL`, else the shipped checkpoint of a clone, else the
    default Hub id."""
    if source or os.environ.get(MODEL_ENV):
        return source or os.environ[MODEL_ENV]
    return str(SHIPPED_MODEL) if (SHIPPED_MODEL / "config.json").is_file() else DEFAULT_MODEL


def display_name(source: str) -> str:
    """How the page names a model: a Hub id as is, a folder of this clone relative to it, any other folder by its
    name (the server's own paths are not shown to visitors)."""
    path = Path(source)
    if not path.is_absolute():
        return source
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return path.name


def public_message(message: str, path: Any = None, name: str | None = None) -> str:
    """`message` with the server's paths removed: `path` becomes `name` (the uploaded file's own name), any other
    absolute path its last part."""
    if path is not None and name:
        message = message.replace(os.fspath(path), name)
    return _ABSOLUTE_PATH.sub(r"\1", message)


def _model_file(source: str, name: str) -> Path | None:
    """A file of a local model folder, or of a Hub repo when it can be fetched."""
    folder = Path(source)
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(source, name))
    except Exception as error:  # offline, private repo, no such file
        logger.info("No %s for %s: %s", name, source, error)
        return None


def describe_test_results(source: str) -> str:
    """The checkpoint's held-out test numbers (its `metrics.json` from `scripts/release_report.py`), one Markdown line
    each; empty when the checkpoint has none."""
    path = _model_file(source, "metrics.json")
    if path is None:
        return ""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    if "per_class" not in metrics or "test_images" not in metrics:
        return ""

    def interval(key: str) -> str:
        low_high = (metrics.get("intervals_95") or {}).get(key)
        return f" [95 % CI {low_high[0]:.2f}–{low_high[1]:.2f}]" if low_high else ""

    lines = [
        f"Held-out test split ({metrics['test_images']} images, {metrics['test_lesions']} lesions, split by lesion):",
        f"balanced accuracy {metrics['balanced_accuracy']:.3f}{interval('balanced_accuracy')}, "
        f"macro AUC {metrics['macro_auc']:.3f}{interval('macro_auc')}, "
        f"melanoma sensitivity {metrics['melanoma_sensitivity']:.3f}{interval('melanoma_sensitivity')}, "
        f"ECE {metrics['ece']:.3f} (calibrated).",
    ]
    return "\n".join(lines)


def describe_training_data(source: str, config: Any = None) -> str:
    """What the weights were trained on, as Markdown: the model card's "Training data" section, else the `datasets`
    of its front matter (read by `huggingface_hub.ModelCard`), else a `training_data` entry of the config, else
    "unknown"."""
    card_file = _model_file(source, "README.md")
    if card_file is not None:
        from huggingface_hub import ModelCard

        try:
            card = ModelCard.load(card_file)
        except Exception as error:  # a card without valid front matter: fall back to the config
            logger.warning("Cannot read the model card of %s: %s", source, error)
        else:
            section = re.search(r"^## Training data\s*\n(.*?)(?=^## |\Z)", card.text, flags=re.M | re.S)
            if section and section.group(1).strip():
                return section.group(1).strip()
            datasets = card.data.datasets
            if datasets:
                return ", ".join([datasets] if isinstance(datasets, str) else datasets)
    described = getattr(config, "training_data", None)
    return str(described) if described else "unknown"


def load_model(source: str) -> LoadedModel:
    """Load the analysis pipeline of `source`; any failure is recorded in `.error` instead of raised, so the page can
    say what went wrong."""
    try:
        import modeling_skinlesion

        modeling_skinlesion.register()  # only in a clone of the project: registers the task locally
    except ImportError:
        pass  # on a Space: everything comes from the model repo's remote code
    try:
        from transformers import pipeline

        # A checkpoint exported for the Hub names its pipeline class in `custom_pipelines`; that remote code is used
        # even where the package is installed, so this runs exactly what a Space runs.
        analyzer = pipeline(TASK, model=source, trust_remote_code=True)
    except Exception as error:  # a missing repo, no network, a broken folder, ...: all are shown on the page
        logger.exception("Could not load the model %s", source)
        return LoadedModel(source=source, error=public_message(f"{type(error).__name__}: {error}"))
    config = analyzer.model.config
    return LoadedModel(
        source=source,
        pipeline=analyzer,
        labels=[config.id2label[i] for i in sorted(config.id2label)],
        sex_choices=list(config.sex_vocab),
        site_choices=list(config.site_vocab),
        training_data=describe_training_data(source, config),
        test_summary=describe_test_results(source),
    )


def get_model(source: str | None = None) -> LoadedModel:
    """The model of `source` (see `model_source`), loaded on first use and kept for the life of the process."""
    source = model_source(source)
    with _MODELS_LOCK:
        if source not in _MODELS:
            _MODELS[source] = load_model(source)
        return _MODELS[source]


# --------------------------------------------------------------------------------------------------------------------
# Input checks (sizes only: reading the image and the metadata is the pipeline's job)
# --------------------------------------------------------------------------------------------------------------------
def user_error(message: str) -> gr.Error:
    """An error shown to the user in the page (a toast) or the API client; bad input is not a server fault, so no
    traceback is printed."""
    return gr.Error(message, print_exception=False)


def _check_size(width: int, height: int, name: str = "The image") -> None:
    if width * height > MAX_PIXELS:
        raise user_error(
            f"{name} is {width}x{height} pixels, more than the limit of {MAX_PIXELS // 1_000_000} megapixels; "
            "downscale it (dermoscopy images rarely exceed 25 megapixels)."
        )
    if min(width, height) < MIN_SIDE:
        raise user_error(
            f"{name} is only {width}x{height} pixels; each side must be at least {MIN_SIDE} pixels for the model "
            "to see the lesion."
        )


def check_image(image: Any, name: str) -> None:
    """Refuse, with a `gr.Error`, an image that is missing, too small or too large (from a file's header, before any
    pixel is decoded). A file that cannot even be opened is left to the pipeline's reader, whose message says why."""
    if image is None:
        raise user_error("No image: upload a dermoscopic image (JPEG or PNG) or pick one of the examples.")
    if isinstance(image, Image.Image):
        _check_size(*image.size, name)
    elif isinstance(image, np.ndarray):
        if image.ndim in (2, 3):
            _check_size(image.shape[1], image.shape[0], name)
    elif isinstance(image, (str, os.PathLike)):
        try:
            with warnings.catch_warnings():
                # PIL warns between its limit and twice it; the size check refuses those images with a message.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                header = Image.open(image)  # reads the header only
        except Image.DecompressionBombError:
            raise user_error(
                f"{name} declares more than {2 * MAX_PIXELS // 1_000_000} megapixels and was refused (a possible "
                "decompression bomb); downscale it."
            ) from None
        except Exception:  # not an image, missing, ...: the pipeline's reader says which
            return
        with header:
            _check_size(*header.size, name)


def _given(value: Any) -> bool:
    """Whether a form field holds something (an untouched box or "unknown" means missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return str(value).strip().lower() not in ("", UNKNOWN)


# --------------------------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------------------------
def _format_focus(result: dict[str, Any]) -> str:
    focus = result.get("lesion_focus") or {}
    lines = [
        "**Lesion focus** (share of the Grad-CAM heatmap inside the predicted lesion mask; 1 = all on the lesion)",
        "",
        "| branch | lesion focus |",
        "| --- | --- |",
    ]
    for branch in ("image", "lesion"):
        if branch in focus:
            value = focus[branch]
            shown = "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"
            lines.append(f"| {branch} branch | {shown} |")
    if any(value is None or (isinstance(value, float) and math.isnan(value)) for value in focus.values()):
        lines += ["", "n/a: that heatmap is all zero (no gradient reached the layer), so it has no mass to share."]
    if result.get("mask_empty"):
        lines += [
            "",
            "⚠️ The segmenter found no lesion: the lesion branch saw the whole image, and the focus scores are not "
            "meaningful.",
        ]
    return "\n".join(lines)


def _format_metadata(result: dict[str, Any], given: dict[str, Any]) -> str:
    """The metadata as the pipeline read it; a field that was filled in but not understood says so."""
    used = result.get("metadata_used") or {}
    lines = ["**Metadata used**", "", "| field | value |", "| --- | --- |"]
    lines += [f"| {name} | {f'{value:g}' if isinstance(value, float) else value} |" for name, value in used.items()]
    for name in result.get("metadata_missing") or []:
        raw = given.get(name)
        reason = f"{raw!r} not understood, " if _given(raw) else ""
        lines.append(f"| {name} | missing ({reason}treated as unknown) |")
    ignored = result.get("metadata_ignored") or []
    if ignored:
        lines += ["", f"This model has no metadata branch; ignored: {', '.join(ignored)}."]
    return "\n".join(lines)


REFUSAL = "This does not look like a dermoscopic image of a skin lesion: no diagnosis shown"


def _format_assessment(result: dict[str, Any], config: Any, show_anyway: bool) -> str:
    """The trust verdict and the referral line, as Markdown: the refusal message when the out-of-distribution gate
    rejects the image (unless `show_anyway`), else the referral decision at the config's operating point."""
    lines = []
    refused = result.get("in_distribution") is False
    score = result.get("ood_score")
    if refused:
        lines += [
            f"### ⛔ {REFUSAL}.",
            f"Out-of-distribution score {score:.1f} is above the gate's threshold {config.ood_threshold:.1f} "
            "(set so that 95 % of held-out dermoscopic images pass). The mask and heatmaps below are still shown; "
            "tick *Show the raw output anyway* to see the model's class probabilities regardless.",
        ]
        if not show_anyway:
            return "\n".join(lines)
        lines += ["", "⚠️ **Raw output shown on request: it should not be trusted for this image.**", ""]
    elif score is None:
        lines.append(
            "ℹ️ This model has no out-of-distribution gate: it cannot tell whether this is a dermoscopic image."
        )
    else:
        lines.append(
            f"✅ Looks like a dermoscopic image (out-of-distribution score {score:.1f} ≤ {config.ood_threshold:.1f})."
        )
    refer = result.get("refer")
    if refer is not None:
        point = (
            f"operating point: sensitivity {config.referral_sensitivity:.2f}, specificity "
            f"{config.referral_specificity:.2f} for malignant lesions ({', '.join(config.malignant_labels)}) on the "
            f"validation split"
        )
        verdict = "🔶 **Refer for examination**" if refer else "**No referral indicated at this operating point**"
        lines += [
            "",
            f"{verdict}: malignancy score {result['malignancy_score']:.3f} "
            f"{'≥' if refer else '<'} threshold {config.referral_threshold:.3f} ({point}).",
        ]
    elif result.get("malignancy_score") is not None:
        lines += ["", f"Malignancy score {result['malignancy_score']:.3f} (this model has no referral point)."]
    return "\n".join(lines)


def _trust_fields(result: dict[str, Any]) -> dict[str, Any]:
    """The gate's and the referral's fields of a result, as the API returns them."""
    return {key: result.get(key) for key in ("ood_score", "in_distribution", "malignancy_score", "refer")}


def _enlarged(image: Image.Image | None, side: int = DISPLAY_SIDE) -> Image.Image | None:
    """The lesion image is as small as the model input (64 px for the tiny presets); enlarge it for display only."""
    if image is None or max(image.size) >= side:
        return image
    scale = side / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)


def predict(
    image: Any,
    age: Any = None,
    sex: Any = None,
    site: Any = None,
    show_anyway: bool = False,
    source: str | None = None,
    name: str | None = None,
) -> tuple:
    """Analyse one image (a file path, PIL image or numpy array) with the patient's age, sex and site as typed in the
    form (None, blank or "unknown" = missing), passed unchanged to the pipeline's metadata parser.

    Returns, in the order of the page's outputs: the mask overlay, the lesion image, the Grad-CAM overlays of the
    image and lesion branches (PIL images), the class probabilities (`{label: probability}`; None when the
    out-of-distribution gate refuses the image and `show_anyway` is off), the lesion-focus Markdown, the metadata
    Markdown, the assessment Markdown (refusal message or referral line) and the trust fields (`ood_score`,
    `in_distribution`, `malignancy_score`, `refer`). Bad input raises a `gr.Error` whose message names no server path
    (`name` is what the user calls the file; by default its file name).
    """
    model = get_model(source)
    if not model.ok:
        raise user_error(f"The model {model.name!r} could not be loaded, so nothing can be analysed. {model.error}")
    if name is None:
        name = Path(image).name if isinstance(image, (str, os.PathLike)) else "The image"
    check_image(image, name)
    metadata = {"age": age, "sex": sex, "site": site}
    try:
        result = model.pipeline(image, metadata=metadata)
    except ValueError as error:  # the reader's and the processor's messages for bad input
        path = image if isinstance(image, (str, os.PathLike)) else None
        raise user_error(public_message(str(error), path, name)) from None
    except Exception as error:  # keep the server up and tell the user; the traceback goes to the log
        logger.exception("Prediction failed")
        raise user_error(public_message(f"The analysis failed ({type(error).__name__}: {error}).")) from None
    if result.get("mask_empty"):
        gr.Warning("The segmenter found no lesion in this image; the lesion branch used the whole image.")
    missing = result.get("metadata_missing") or []
    not_understood = [f"{key} {metadata[key]!r}" for key in missing if _given(metadata[key])]
    if not_understood:
        gr.Warning(f"Not understood, treated as missing: {', '.join(not_understood)}.")
    probabilities = {label: float(p) for label, p in result["probabilities"].items()}
    if result.get("in_distribution") is False and not show_anyway:
        probabilities = None  # the refusal message takes the diagnosis' place
    return (
        result["mask_overlay"],
        _enlarged(result["lesion_image"]),
        result["heatmap_overlays"].get("image"),
        result["heatmap_overlays"].get("lesion"),
        probabilities,
        _format_focus(result),
        _format_metadata(result, metadata),
        _format_assessment(result, model.pipeline.model.config, bool(show_anyway)),
        _trust_fields(result),
    )


# --------------------------------------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------------------------------------
_last_prune = 0.0
_prune_lock = threading.Lock()


def _prune_outputs(root: Path) -> None:
    """Remove request folders older than `OUTPUT_MAX_AGE_S` (checked at most once a minute)."""
    global _last_prune
    with _prune_lock:
        now = time.time()
        if now - _last_prune < 60:
            return
        _last_prune = now
    for folder in root.glob("request-*"):
        try:
            if now - folder.stat().st_mtime > OUTPUT_MAX_AGE_S:
                shutil.rmtree(folder, ignore_errors=True)
        except FileNotFoundError:  # pruned by another thread
            continue


def output_files(images: tuple[Image.Image | None, ...]) -> list[str | None]:
    """Each output image as a PNG in a folder of its own request.

    gradio 6.31 writes PIL outputs to a content-addressed cache file with a plain, non-atomic write, so two requests
    that produce the same image (two users on the same example) can be served each other's half-written file. Files
    with unique paths are instead copied into that cache atomically (staged, then renamed). Our copies are removed
    once they are `OUTPUT_MAX_AGE_S` old.
    """
    root = Path(tempfile.gettempdir()) / "skin_dualnet_space"
    root.mkdir(parents=True, exist_ok=True)
    _prune_outputs(root)
    folder = Path(tempfile.mkdtemp(prefix="request-", dir=root))
    paths: list[str | None] = []
    for name, image in zip(OUTPUT_IMAGES, images):
        if image is None:
            paths.append(None)
            continue
        path = folder / f"{name}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def examples() -> list[list[Any]]:
    """`[path, age, sex, site]` rows of the bundled CC0 examples (see `examples/ATTRIBUTION.md`)."""
    table = EXAMPLES_DIR / "examples.csv"
    if not table.is_file():
        return []
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [[str(EXAMPLES_DIR / row["file"]), row["age"], row["sex"], row["site"]] for row in rows]


def model_status(model: LoadedModel) -> str:
    if not model.ok:
        return (
            f"### ❌ The model could not be loaded\n"
            f"`{model.name}` (set `{MODEL_ENV}` to a Hub id or a local folder): {model.error}\n\n"
            "Predictions are disabled until the app is restarted with a loadable model."
        )
    return (
        f"**Model:** `{model.name}` — classes: {', '.join(model.labels)}\n\n"
        + (f"**How it scored:** {model.test_summary}\n\n" if model.test_summary else "")
        + f"**What these weights were trained on:**\n\n{model.training_data}"
    )


def _image_panel(label: str, elem_id: str) -> gr.Image:
    # min_width: two panels share a row on a desktop; below ~560 px the row wraps to one panel per row.
    return gr.Image(type="pil", label=label, elem_id=elem_id, height=PANEL_HEIGHT, min_width=260)


def build(source: str | None = None, queue_size: int = QUEUE_SIZE) -> gr.Blocks:
    """The page: inputs on the left, results beside them (below them on a phone), examples and model details under
    both. The model (`source`, else `$SKIN_DUALNET_MODEL`, else the default) is loaded here, once. `queue_size`
    requests may wait beyond the ones running."""
    model = get_model(source)
    sex_choices = [UNKNOWN] + [s for s in model.sex_choices if s != UNKNOWN]
    site_choices = [UNKNOWN] + [s for s in model.site_choices if s != UNKNOWN]

    def analyse(
        image: dict | None,
        age: str | float | None = None,
        sex: str | None = UNKNOWN,
        site: str | None = UNKNOWN,
        show_anyway: bool = False,
    ) -> tuple:
        # The event runs with `preprocess=False`: the upload arrives as gradio's file record (already checked to lie
        # in the upload folder) and is decoded only by the pipeline's reader, after `check_image` read its header.
        path, name = image, None
        if isinstance(image, dict):
            path = image.get("path")
            name = image.get("orig_name") or (Path(path).name if path else None)
        outputs = predict(path, age, sex, site, show_anyway, source=model.source, name=name)
        return (*output_files(outputs[:4]), *outputs[4:])

    with gr.Blocks(title="skin-dualnet research demo") as demo:
        gr.Markdown("# skin-dualnet: lesion segmentation, classification and Grad-CAM")
        gr.Markdown(DISCLAIMER, elem_id="disclaimer")
        with gr.Row(elem_id="main-row"):
            with gr.Column(scale=1, min_width=300, elem_id="inputs"):
                image = gr.Image(
                    type="filepath",
                    label="Dermoscopic image",
                    sources=["upload", "clipboard"],
                    height=PANEL_HEIGHT,
                    elem_id="image",
                )
                # A text box: gradio 6.31's Number box turns an empty value into 0 in the browser (`value ??= 0`),
                # and 0 would be used as a real age. The pipeline parses what is typed (blank = missing).
                age = gr.Textbox(
                    value=None,
                    label="Age in years (optional)",
                    placeholder="e.g. 55 (leave empty if unknown)",
                    max_lines=1,
                    elem_id="age",
                )
                sex = gr.Dropdown(sex_choices, value=UNKNOWN, label="Sex (optional)", elem_id="sex")
                site = gr.Dropdown(site_choices, value=UNKNOWN, label="Anatomical site (optional)", elem_id="site")
                show_anyway = gr.Checkbox(
                    value=False,
                    label="Show the raw output anyway (for images the model flags as not dermoscopic)",
                    elem_id="show-anyway",
                )
                run = gr.Button("Analyse", variant="primary", elem_id="run", interactive=model.ok)
            with gr.Column(scale=2, min_width=300, elem_id="results"):
                assessment = gr.Markdown(label="Assessment", elem_id="assessment")
                with gr.Row():
                    probabilities = gr.Label(
                        num_top_classes=min(TOP_K, len(model.labels) or TOP_K),
                        label="Class probabilities",
                        elem_id="probabilities",
                        min_width=260,
                    )
                    with gr.Column(min_width=260):
                        focus = gr.Markdown(label="Lesion focus", elem_id="focus")
                        metadata = gr.Markdown(label="Metadata used", elem_id="metadata")
                with gr.Row():
                    mask_overlay = _image_panel("Predicted lesion mask", "mask-overlay")
                    lesion_image = _image_panel("Lesion image (second branch input)", "lesion-image")
                with gr.Row():
                    cam_image = _image_panel("Grad-CAM: image branch", "cam-image")
                    cam_lesion = _image_panel("Grad-CAM: lesion branch", "cam-lesion")
                trust = gr.JSON(label="Trust and referral", elem_id="trust")
        if model.ok and examples():
            picker = gr.Examples(
                examples(),
                inputs=[image, age, sex, site],
                label="Examples (ISIC Archive, CC0): click a row to fill the form",
                cache_examples=False,
                elem_id="examples",
            )
            picker.dataset.headers = ["Image", "Age", "Sex", "Anatomical site"]  # short: they fit a phone's width
        gr.Markdown(model_status(model), elem_id="model-info")
        outputs = [
            mask_overlay,
            lesion_image,
            cam_image,
            cam_lesion,
            probabilities,
            focus,
            metadata,
            assessment,
            trust,
        ]
        run.click(
            analyse,
            inputs=[image, age, sex, site, show_anyway],
            outputs=outputs,
            api_name="predict",
            preprocess=False,
        )
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=queue_size)
    return demo


def launch_options() -> dict[str, Any]:
    """Keyword arguments of `demo.launch` that are part of the app's safety limits and look."""
    return {"max_file_size": MAX_FILE_SIZE, "show_error": True, "allowed_paths": [str(EXAMPLES_DIR)], "css": CSS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help=f"Hub id or local folder (default: ${MODEL_ENV} or the Hub).")
    parser.add_argument("--host", default=None, help="Interface to listen on (default: $GRADIO_SERVER_NAME or local).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: $GRADIO_SERVER_PORT or 7860).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:  # in a clone: an unreachable model id fails in seconds, with one line (a Space shows the reason instead)
        from modeling_skinlesion.hub import check_model_source
    except ImportError:
        pass
    else:
        try:
            check_model_source(model_source(args.model))
        except ValueError as error:
            raise SystemExit(str(error)) from None
    build(args.model).launch(server_name=args.host, server_port=args.port, **launch_options())


if __name__ == "__main__":
    main()
