"""skin-dualnet research demo: lesion mask, class probabilities and Grad-CAM for both branches.

The model comes from `SKIN_DUALNET_MODEL` (a Hub id or a local folder); by default the release checkpoint shipped in
the repository (`checkpoints/skin-dualnet-small`) when the app runs from a clone, else the Hub repo `org/skin-dualnet`
(the id the release is published under). It is loaded once per process through its remote code
(`trust_remote_code=True`), so the Space needs no copy of this project's package.

    SKIN_DUALNET_MODEL=outputs/demo-model python space/app.py --port 7860

`predict(image, age, sex, site)` is a plain function (testable without a server); `build()` returns the `gr.Blocks`
page; `launch()` runs only under `__main__`.
"""

import argparse
import csv
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

import gradio as gr
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger("skin_dualnet_space")

MODEL_ENV = "SKIN_DUALNET_MODEL"
DEFAULT_MODEL = "org/skin-dualnet"
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "skin-dualnet-small"
TASK = "skin-lesion-analysis"
# Dermoscopy images are at most ~25 MP; anything far larger is refused before it is decoded. PIL raises a
# DecompressionBombError itself above twice this limit, even for code paths that bypass `read_image`.
MAX_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
MIN_SIDE = 32
MAX_FILE_SIZE = "10mb"
MAX_AGE = 120
CONCURRENCY_LIMIT = 2
# Waiting requests beyond the ones running; a burst of up to this many visitors is queued (each sees its place in
# the queue), the next ones are refused with gradio's "queue is full" message.
QUEUE_SIZE = 128
TOP_K = 5
DISPLAY_SIDE = 256
OUTPUT_IMAGES = ("mask_overlay", "lesion_image", "gradcam_image_branch", "gradcam_lesion_branch")
OUTPUT_MAX_AGE_S = 600
UNKNOWN = "unknown"
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"

DISCLAIMER = (
    "## ⚠️ Research demo — not a medical device\n"
    "This page shows what a research model computes. It has not been cleared or approved by any regulator, its "
    "output can be wrong in ways that matter, and it must not be used to diagnose, treat, triage or reassure anyone. "
    "If you are worried about a skin lesion, see a doctor."
)


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


_MODELS: dict[str, LoadedModel] = {}
_MODELS_LOCK = threading.Lock()


def model_source(source: str | None = None) -> str:
    """The model to serve: `source`, else `$SKIN_DUALNET_MODEL`, else the shipped checkpoint of a clone, else the
    default Hub id."""
    if source or os.environ.get(MODEL_ENV):
        return source or os.environ[MODEL_ENV]
    return str(SHIPPED_MODEL) if (SHIPPED_MODEL / "config.json").is_file() else DEFAULT_MODEL


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
    import json

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


def _model_card_text(source: str) -> str | None:
    """The model card (`README.md`) of a local folder, or of a Hub repo when it can be fetched."""
    card = _model_file(source, "README.md")
    return card.read_text(encoding="utf-8", errors="replace") if card is not None else None


def describe_training_data(source: str, config: Any = None) -> str:
    """What the weights were trained on, as Markdown: the model card's "Training data" section, else its `datasets`
    front-matter entry, else a `training_data` entry of the config, else "unknown"."""
    card = _model_card_text(source)
    if card:
        section = re.search(r"^## Training data\s*\n(.*?)(?=^## |\Z)", card, flags=re.M | re.S)
        if section and section.group(1).strip():
            return section.group(1).strip()
        front = re.match(r"^---\n(.*?)\n---", card, flags=re.S)
        if front:
            names = re.search(r"^datasets:\s*\n((?:\s*-\s*.+\n?)+)", front.group(1), flags=re.M)
            if names:
                return ", ".join(line.strip()[1:].strip() for line in names.group(1).strip().splitlines())
    described = getattr(config, "training_data", None)
    return str(described) if described else "unknown"


def load_model(source: str) -> LoadedModel:
    """Load the analysis pipeline of `source`; any failure is recorded in `.error` instead of raised, so the page can
    say what went wrong."""
    try:
        import modeling_skinlesion  # noqa: F401  (only in a clone of the project: registers the task locally)
    except ImportError:
        pass  # on a Space: everything comes from the model repo's remote code
    try:
        from transformers import pipeline

        # A checkpoint exported for the Hub names its pipeline class in `custom_pipelines`; that remote code is used
        # even where the package is installed, so this runs exactly what a Space runs.
        analyzer = pipeline(TASK, model=source, trust_remote_code=True)
    except Exception as error:  # a missing repo, no network, a broken folder, ...: all are shown on the page
        logger.exception("Could not load the model %s", source)
        return LoadedModel(source=source, error=f"{type(error).__name__}: {error}")
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
# Input checks
# --------------------------------------------------------------------------------------------------------------------
def user_error(message: str) -> gr.Error:
    """An error shown to the user in the page (a toast) or the API client; bad input is not a server fault, so no
    traceback is printed."""
    return gr.Error(message, print_exception=False)


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise user_error(
            f"The image is {width}x{height} pixels, more than the limit of {MAX_PIXELS // 1_000_000} megapixels; "
            "downscale it (dermoscopy images rarely exceed 25 megapixels)."
        )
    if min(width, height) < MIN_SIDE:
        raise user_error(
            f"The image is only {width}x{height} pixels; each side must be at least {MIN_SIDE} pixels for the model "
            "to see the lesion."
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """EXIF rotation applied; grayscale, palette, 16-bit or transparent images as RGB (transparency on white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        image = Image.fromarray((np.clip(array / max(array.max(), 1.0), 0, 1) * 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def read_image(image: Any) -> Image.Image:
    """An upload (file path, PIL image or numpy array) as an RGB PIL image; a `gr.Error` says what is wrong with any
    other input: nothing uploaded, not an image, truncated, too large (decompression bomb) or too small."""
    if image is None:
        raise user_error("No image: upload a dermoscopic image (JPEG or PNG) or pick one of the examples.")
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or image.size == 0:
            raise user_error(f"The image array has shape {image.shape}; expected (height, width[, channels]).")
        _check_size(image.shape[1], image.shape[0])
        array = image if image.dtype == np.uint8 else np.clip(image, 0, 255).astype(np.uint8)
        image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
    if isinstance(image, Image.Image):
        _check_size(*image.size)
        return _to_rgb(image)
    if not isinstance(image, (str, os.PathLike)):
        raise user_error(f"Expected an image file, got {type(image).__name__}.")
    name = Path(image).name
    try:
        with warnings.catch_warnings():
            # PIL warns between its limit and twice it; the size check below refuses those images with a message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(image)
        with opened:
            _check_size(*opened.size)  # from the header, before any pixel is decoded
            opened.load()
            return _to_rgb(opened)
    except gr.Error:  # a subclass of ValueError: let the size checks' messages through unchanged
        raise
    except FileNotFoundError:
        raise user_error(f"The uploaded file {name} is missing on the server; upload it again.") from None
    except Image.DecompressionBombError:
        raise user_error(
            f"{name} declares more than {MAX_PIXELS // 1_000_000} megapixels and was refused (a possible "
            "decompression bomb); downscale it."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise user_error(f"{name} is not a readable image (JPEG, PNG, ...): {error}") from None


def parse_metadata(model: LoadedModel, age: Any, sex: Any, site: Any) -> dict[str, Any]:
    """The metadata record for the pipeline; blanks and "unknown" mean missing, anything else must be valid."""
    record: dict[str, Any] = {}
    if age is not None and not (isinstance(age, str) and not age.strip()):
        try:
            value = float(age)
        except (TypeError, ValueError):
            raise user_error(f"Age must be a number of years, got {age!r}.") from None
        if math.isnan(value):
            pass
        elif not 0 <= value <= MAX_AGE:
            raise user_error(f"Age must lie between 0 and {MAX_AGE} years, got {value:g}.")
        else:
            record["age"] = value
    for name, value, choices in (("sex", sex, model.sex_choices), ("site", site, model.site_choices)):
        if value is None or str(value).strip().lower() in ("", UNKNOWN):
            continue
        if value not in choices:
            raise user_error(f"Unknown {name} {value!r}; choose one of {choices}.")
        record[name] = value
    return record


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


def _format_metadata(result: dict[str, Any]) -> str:
    used = result.get("metadata_used") or {}
    lines = ["**Metadata used**", "", "| field | value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in used.items()]
    lines += [f"| {name} | missing (treated as unknown) |" for name in result.get("metadata_missing") or []]
    ignored = result.get("metadata_ignored") or []
    if ignored:
        lines += ["", f"This model has no metadata branch; ignored: {', '.join(ignored)}."]
    return "\n".join(lines)


def _enlarged(image: Image.Image | None, side: int = DISPLAY_SIDE) -> Image.Image | None:
    """The lesion image is as small as the model input (64 px for the tiny presets); enlarge it for display only."""
    if image is None or max(image.size) >= side:
        return image
    scale = side / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)


def predict(image: Any, age: Any = None, sex: Any = None, site: Any = None, source: str | None = None) -> tuple:
    """Analyse one image.

    Returns, in the order of the page's outputs: the mask overlay, the lesion image, the Grad-CAM overlays of the
    image and lesion branches (PIL images), the class probabilities (`{label: probability}`), the lesion-focus
    Markdown and the metadata Markdown. Bad input raises a `gr.Error` with a message for the user.
    """
    model = get_model(source)
    if not model.ok:
        raise user_error(f"The model {model.source!r} could not be loaded, so nothing can be analysed. {model.error}")
    rgb = read_image(image)
    record = parse_metadata(model, age, sex, site)
    try:
        result = model.pipeline(rgb, metadata=record)
    except ValueError as error:
        raise user_error(f"The model could not analyse this image: {error}") from None
    except Exception as error:  # keep the server up and tell the user; the traceback goes to the log
        logger.exception("Prediction failed")
        raise user_error(f"The analysis failed ({type(error).__name__}: {error}).") from None
    if result.get("mask_empty"):
        gr.Warning("The segmenter found no lesion in this image; the lesion branch used the whole image.")
    probabilities = {label: float(p) for label, p in result["probabilities"].items()}
    return (
        result["mask_overlay"],
        _enlarged(result["lesion_image"]),
        result["heatmap_overlays"].get("image"),
        result["heatmap_overlays"].get("lesion"),
        probabilities,
        _format_focus(result),
        _format_metadata(result),
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
    return [[str(EXAMPLES_DIR / row["file"]), float(row["age"]), row["sex"], row["site"]] for row in rows]


def model_status(model: LoadedModel) -> str:
    if not model.ok:
        return (
            f"### ❌ The model could not be loaded\n"
            f"`{model.source}` (set `{MODEL_ENV}` to a Hub id or a local folder): {model.error}\n\n"
            "Predictions are disabled until the app is restarted with a loadable model."
        )
    return (
        f"**Model:** `{model.source}` — classes: {', '.join(model.labels)}\n\n"
        + (f"**How it scored:** {model.test_summary}\n\n" if model.test_summary else "")
        + f"**What these weights were trained on:**\n\n{model.training_data}"
    )


def build(source: str | None = None) -> gr.Blocks:
    """The page. The model (`source`, else `$SKIN_DUALNET_MODEL`, else the default) is loaded here, once."""
    model = get_model(source)
    sex_choices = [UNKNOWN] + [s for s in model.sex_choices if s != UNKNOWN]
    site_choices = [UNKNOWN] + [s for s in model.site_choices if s != UNKNOWN]

    def analyse(
        image: dict | None, age: float | None = None, sex: str | None = UNKNOWN, site: str | None = UNKNOWN
    ) -> tuple:
        # The event runs with `preprocess=False`: the upload arrives as gradio's file record (already checked to lie
        # in the upload folder) and is decoded only by `read_image`, whose size check precedes any pixel decoding.
        path = image.get("path") if isinstance(image, dict) else image
        outputs = predict(path, age, sex, site, source=model.source)
        return (*output_files(outputs[:4]), *outputs[4:])

    with gr.Blocks(title="skin-dualnet research demo") as demo:
        gr.Markdown("# skin-dualnet: lesion segmentation, classification and Grad-CAM")
        gr.Markdown(DISCLAIMER, elem_id="disclaimer")
        gr.Markdown(model_status(model), elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    type="filepath", label="Dermoscopic image", sources=["upload", "clipboard"], elem_id="image"
                )
                # No starting value: an untouched box is a missing age (0 would be used as a real age).
                age = gr.Number(
                    value=None,
                    label="Age in years (optional)",
                    minimum=0,
                    maximum=MAX_AGE,
                    precision=0,
                    elem_id="age",
                )
                sex = gr.Dropdown(sex_choices, value=UNKNOWN, label="Sex (optional)", elem_id="sex")
                site = gr.Dropdown(site_choices, value=UNKNOWN, label="Anatomical site (optional)", elem_id="site")
                run = gr.Button("Analyse", variant="primary", elem_id="run", interactive=model.ok)
                if model.ok and examples():
                    gr.Examples(
                        examples(),
                        inputs=[image, age, sex, site],
                        label="Examples (ISIC Archive, CC0)",
                        cache_examples=False,
                        elem_id="examples",
                    )
            with gr.Column(scale=1):
                probabilities = gr.Label(
                    num_top_classes=min(TOP_K, len(model.labels) or TOP_K),
                    label="Class probabilities",
                    elem_id="probabilities",
                )
                focus = gr.Markdown(label="Lesion focus", elem_id="focus")
                metadata = gr.Markdown(label="Metadata used", elem_id="metadata")
        with gr.Row():
            mask_overlay = gr.Image(type="pil", label="Predicted lesion mask", elem_id="mask-overlay")
            lesion_image = gr.Image(
                type="pil", label="Lesion image (second branch input, enlarged)", elem_id="lesion-image"
            )
        with gr.Row():
            cam_image = gr.Image(type="pil", label="Grad-CAM: image branch", elem_id="cam-image")
            cam_lesion = gr.Image(type="pil", label="Grad-CAM: lesion branch", elem_id="cam-lesion")
        run.click(
            analyse,
            inputs=[image, age, sex, site],
            outputs=[mask_overlay, lesion_image, cam_image, cam_lesion, probabilities, focus, metadata],
            api_name="predict",
            preprocess=False,
        )
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_SIZE)
    return demo


def launch_options() -> dict[str, Any]:
    """Keyword arguments of `demo.launch` that are part of the app's safety limits."""
    return {"max_file_size": MAX_FILE_SIZE, "show_error": True, "allowed_paths": [str(EXAMPLES_DIR)]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help=f"Hub id or local folder (default: ${MODEL_ENV} or the Hub).")
    parser.add_argument("--host", default=None, help="Interface to listen on (default: $GRADIO_SERVER_NAME or local).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: $GRADIO_SERVER_PORT or 7860).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build(args.model).launch(server_name=args.host, server_port=args.port, **launch_options())


if __name__ == "__main__":
    main()
