"""The "skin-lesion-analysis" pipeline: skin-dualnet's one inference stack.

`SkinLesionAnalysisPipeline` is a transformers `Pipeline`: `preprocess` reads each image once (`load_image`), processes
it and parses its metadata record once; `_forward` segments, classifies and (by default) explains a batch;
`postprocess` puts the mask and the heatmaps back on the original image, renders the overlays and builds the result
dict. Lists, datasets
and `batch_size` go through transformers' own `Pipeline.__call__` (its DataLoader, collation and un-batching).
`SkinLesionAnalyzer` (package-only, `modeling_skinlesion.analyzer`) is a thin convenience over this class.
`save_for_hub` writes a model folder whose config carries both `auto_map` and `custom_pipelines`, with every code file
flat beside the weights.

Remote-code boundary: the `modeling_skinlesion/*_skinlesion.py` files (configuration, modeling, image processing,
explaining, pipeline) are exactly the files shipped to the Hub as remote code. They import only each other (single-dot
relative imports) plus torch, transformers, timm, numpy, PIL and the standard library; every other module of the
package (analyzer, grad_cam_backend, data, metrics, model_card, hub) is package-only and is never imported from here.
tests/test_remote_code_boundary.py checks the rule. So the pytorch-grad-cam backend reaches this pipeline as an
object: `pipeline(..., explainer=modeling_skinlesion.grad_cam_backend.get_explainer("scorecam"))`.
"""

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Pipeline
from transformers.utils import logging

from .explaining_skinlesion import (
    SkinDualNetGradCAM,
    check_dualnet,
    heatmap_to_image,
    lesion_focus,
    preserved_model_state,
    resolve_target_classes,
)
from .image_processing_skinlesion import (
    SkinLesionImageProcessor,
    SkinLesionMetadataProcessor,
    load_image,
    to_rgb_array,
)

logger = logging.get_logger(__name__)

TASK = "skin-lesion-analysis"
METADATA_FIELDS = ("age", "sex", "site")
INPUT_KEYS = ("image", "metadata", "target_class")
METADATA_KEYS = ("age", "sex_ids", "site_ids")
# The model's trust outputs, passed through to every result (None where the checkpoint has no gate / referral point).
TRUST_KEYS = ("ood_score", "in_distribution", "malignancy_score", "refer")


@dataclass
class SkinLesionOriginal:
    """What `postprocess` needs of one input besides tensors: the image as read (an RGB PIL image, or an RGB float
    array for array inputs) and its metadata record as parsed. Travels through the batching untouched."""

    image: Image.Image | np.ndarray
    metadata: dict[str, Any]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the original image."""
        if isinstance(self.image, Image.Image):
            return self.image.height, self.image.width
        return self.image.shape[0], self.image.shape[1]


def _resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Binary masks `(batch_size, 1, h, w)` resized as `post_process_masks` does (bilinear, then > 0.5)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return (F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False) > 0.5).float()


# --------------------------------------------------------------------------------------------------------------------
# Rendering: overlays and the lesion image, as the pipeline returns them
# --------------------------------------------------------------------------------------------------------------------
def rgb_uint8(image: Any) -> np.ndarray:
    """An image (PIL, or an RGB/grey array, uint8 or float in [0, 1]) as a uint8 RGB array `(height, width, 3)`."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"`image` must be an RGB image (PIL or (height, width, 3) array), got shape {array.shape}.")
    if array.dtype != np.uint8:
        array = np.clip(array.astype(np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return array


def _jet_table() -> np.ndarray:
    """matplotlib's 'jet' (blue = 0, red = 1) as a 256-entry uint8 table; written out because remote code may not
    import matplotlib."""
    v = np.linspace(0.0, 1.0, 256, dtype=np.float32)[:, None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0], dtype=np.float32)), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


_JET = _jet_table()


def _heat_index(values: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def heatmap_overlay(image: Any, heatmap: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend a [0, 1] heatmap (jet colours) over an RGB image of the same size, `alpha` being the heatmap's weight."""
    rgb = rgb_uint8(image)
    heat = np.asarray(heatmap)
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"`heatmap` is {heat.shape} but the image is {rgb.shape[:2]}; use heatmap_to_image first.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must lie in [0, 1], got {alpha}.")
    # PIL's palette lookup and blend run in C: a few ms even for a 3000 x 2000 photograph.
    colours = Image.fromarray(_heat_index(heat))
    colours.putpalette(_JET.tobytes())
    return Image.blend(Image.fromarray(rgb), colours.convert("RGB"), alpha)


def _near_background(binary: np.ndarray, width: int) -> np.ndarray:
    """Lesion pixels with a background pixel within `width` (Chebyshev distance): the outline of the mask. A box
    filter by cumulative sums, inside the mask's bounding box: its cost does not grow with `width`. (PIL's
    `MinFilter(2 * width + 1)` erosion gives the same outline, but measured on a 3000 x 2000 mask, width 13: 11.8 s
    against 0.12 s here; SciPy's faster filters are not allowed in remote code.)"""
    rows, cols = np.flatnonzero(binary.any(1)), np.flatnonzero(binary.any(0))
    r0, r1 = max(rows[0] - width, 0), min(rows[-1] + width + 1, binary.shape[0])
    c0, c1 = max(cols[0] - width, 0), min(cols[-1] + width + 1, binary.shape[1])
    near = ~binary[r0:r1, c0:c1]
    for axis in (0, 1):
        moved = np.moveaxis(near, axis, 0).astype(np.int32)
        padding = [(width + 1, width)] + [(0, 0)] * (moved.ndim - 1)
        sums = np.cumsum(np.pad(moved, padding), axis=0)
        near = np.moveaxis(sums[2 * width + 1 :] - sums[: -2 * width - 1] > 0, 0, axis)
    outline = np.zeros_like(binary)
    outline[r0:r1, c0:c1] = near & binary[r0:r1, c0:c1]
    return outline


def mask_overlay(
    image: Any,
    mask: np.ndarray,
    color: tuple[int, int, int] = (0, 200, 80),
    alpha: float = 0.35,
    contour_color: tuple[int, int, int] = (255, 230, 0),
    contour_width: int | None = None,
) -> Image.Image:
    """Tint the lesion (`mask` True) over an RGB image of the same size and draw its outline (`contour_width` pixels,
    by default about 1/150 of the image's short side)."""
    rgb = rgb_uint8(image)
    binary = np.asarray(mask).astype(bool)
    if binary.shape != rgb.shape[:2]:
        raise ValueError(f"`mask` is {binary.shape} but the image is {rgb.shape[:2]}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must lie in [0, 1], got {alpha}.")
    base = Image.fromarray(rgb)
    if not binary.any():
        return base
    tinted = Image.blend(base, Image.new("RGB", base.size, tuple(color)), alpha)
    out = Image.composite(tinted, base, Image.fromarray(binary))
    width = contour_width or max(1, round(min(binary.shape) / 150))
    out.paste(tuple(contour_color), mask=Image.fromarray(_near_background(binary, width)))
    return out


def pixel_values_to_image(
    pixel_values: torch.Tensor, image_mean: Sequence[float], image_std: Sequence[float]
) -> Image.Image:
    """Undo the normalisation of one `(3, height, width)` input (e.g. the lesion image); return it as a PIL image."""
    if pixel_values.ndim != 3 or pixel_values.shape[0] != 3:
        raise ValueError(f"`pixel_values` must have shape (3, height, width), got {tuple(pixel_values.shape)}.")
    mean = torch.tensor(list(image_mean), dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(list(image_std), dtype=torch.float32).view(3, 1, 1)
    rgb = (pixel_values.detach().float().cpu() * std + mean).clamp(0, 1)
    return Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8))


# --------------------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------------------
class SkinLesionAnalysisPipeline(Pipeline):
    r"""
    Segment, classify and explain dermoscopic images with a [`SkinDualNet`] checkpoint.

    Inputs: an image (PIL, numpy or torch array, file path, bytes), a dict `{"image": ..., "metadata": {...},
    "target_class": ...}` (each key but "image" optional), or a list of either (run `batch_size` images per forward).

    Parameters (at construction, or per call):
        metadata (`dict`, *optional*): the patient record (`{"age": 55, "sex": "female", "site": "back"}`; the site
            may also be given as `anatom_site_general` or `localization`) of every image given without its own.
        target_class (`str` or `int`, *optional*): the class to explain (default: the predicted one) for every image
            given without its own.
        explain (`bool`, *optional*, defaults to `True`): compute the heatmaps, their overlays and the lesion focus.
        method (`str`, *optional*, defaults to `"gradcam"`): a fast Grad-CAM method (`FAST_CAM_METHODS`).
        explainer (*optional*): a ready explainer object, e.g. `modeling_skinlesion.grad_cam_backend.get_explainer(
            "scorecam")` for the pytorch-grad-cam methods (package-only, so given as an object).
        clean_masks (`bool`, *optional*, defaults to `True`): keep the largest lesion component and fill holes.
        autocast (`bool`, *optional*): bf16 (fp16 where bf16 is missing) autocast; default: on CUDA only.
        channels_last (`bool`, *optional*, defaults to `False`): give the model channels-last inputs.
        overlay_alpha (`float`, *optional*, defaults to 0.5): weight of the heatmap colours in the overlays.

    Each image gives a dict (see `postprocess`). The model is run in eval mode and left in the mode it was found in.

    Example:
        >>> from transformers import pipeline
        >>> analyze = pipeline("skin-lesion-analysis", model="path/to/folder", trust_remote_code=True)
        >>> result = analyze("lesion.jpg", metadata={"age": 60, "sex": "female", "site": "face"})
        >>> result["predicted_label"], result["lesion_focus"]["lesion"], result["mask_empty"]
    """

    _load_processor = False
    _load_image_processor = None  # optional: built from the model config when the folder has none
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def __init__(self, model: Any, *args: Any, **kwargs: Any):
        check_dualnet(model)
        super().__init__(model, *args, **kwargs)
        if self.image_processor is None:
            self.image_processor = SkinLesionImageProcessor.from_model_config(model.config)
        self.metadata_processor = SkinLesionMetadataProcessor.from_config(model.config)
        self.labels = [model.config.id2label[i] for i in sorted(model.config.id2label)]

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        """One input gives one result dict; a list (or tuple) gives a list, batched by transformers' machinery."""
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        if isinstance(inputs, list) and not inputs:
            raise ValueError("`inputs` is empty; pass at least one image.")
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(
        self,
        metadata: Mapping[str, Any] | None = None,
        target_class: str | int | None = None,
        explain: bool | None = None,
        method: str | None = None,
        explainer: Any = None,
        clean_masks: bool | None = None,
        autocast: bool | None = None,
        channels_last: bool | None = None,
        overlay_alpha: float | None = None,
        **kwargs: Any,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        if kwargs:
            raise ValueError(
                f"Unknown argument(s) {sorted(kwargs)} for the {TASK} pipeline; it accepts metadata, target_class, "
                "explain, method, explainer, clean_masks, autocast, channels_last, overlay_alpha and batch_size."
            )
        preprocess: dict[str, Any] = {}
        if metadata is not None:
            if not isinstance(metadata, Mapping):
                raise ValueError(
                    f"`metadata` of a pipeline call is one mapping for every image, got {type(metadata).__name__}; "
                    "give each image its own as {'image': ..., 'metadata': {...}}."
                )
            preprocess["metadata"] = metadata
        if target_class is not None:
            if isinstance(target_class, (list, tuple)):
                raise ValueError(
                    "`target_class` of a pipeline call is one class for every image; give each image its own as "
                    "{'image': ..., 'target_class': ...}."
                )
            resolve_target_classes(target_class, self.model.config.id2label, 1)  # fail before any work
            preprocess["target_class"] = target_class
        forward: dict[str, Any] = {}
        if method is not None and explainer is not None:
            raise ValueError("Pass either `method` or `explainer`, not both.")
        if method is not None:
            forward["explainer"] = SkinDualNetGradCAM(method)
        if explainer is not None:
            if not callable(explainer):
                raise ValueError(f"`explainer` must be callable like `SkinDualNetGradCAM`, got {explainer!r}.")
            forward["explainer"] = explainer
        for name, value in (("explain", explain), ("clean_masks", clean_masks), ("channels_last", channels_last)):
            if value is not None:
                forward[name] = bool(value)
        if autocast is not None:
            forward["autocast"] = bool(autocast)
        postprocess: dict[str, Any] = {}
        if overlay_alpha is not None:
            if not 0.0 <= overlay_alpha <= 1.0:
                raise ValueError(f"`overlay_alpha` must lie in [0, 1], got {overlay_alpha}.")
            postprocess["overlay_alpha"] = overlay_alpha
        return preprocess, forward, postprocess

    @staticmethod
    def _split(inputs: Any, metadata: Any, target_class: Any) -> tuple[Any, Any, Any]:
        if not isinstance(inputs, Mapping):
            return inputs, metadata, target_class
        if "image" not in inputs or set(inputs) - set(INPUT_KEYS):
            raise ValueError(
                f"A dict input needs an 'image' key (and optionally 'metadata' and 'target_class'), got "
                f"{sorted(inputs)}."
            )
        return inputs["image"], inputs.get("metadata", metadata), inputs.get("target_class", target_class)

    def preprocess(self, inputs: Any, metadata: Any = None, target_class: Any = None) -> dict[str, Any]:
        """Read one image (once), process it, parse its metadata record (once) and resolve its target class."""
        image, record, target = self._split(inputs, metadata, target_class)
        if isinstance(image, (np.ndarray, torch.Tensor)):
            original = to_rgb_array(image, "image")
        else:
            original = load_image(image, None if isinstance(image, (str, os.PathLike)) else "image")
        pixel_values = self.image_processor(original, return_tensors="pt")["pixel_values"]
        parsed = self.metadata_processor.normalize_record(record)
        target = resolve_target_classes(target, self.model.config.id2label, 1)[0]
        return {
            "pixel_values": pixel_values,
            **self.metadata_processor.encode([parsed]),
            "target_class": torch.tensor([-1 if target is None else target]),  # -1: the predicted class
            "original": SkinLesionOriginal(original, parsed),
        }

    def get_inference_context(self):
        """No blanket `torch.no_grad`: Grad-CAM needs gradients in `_forward`, which turns them off itself for the
        segmentation and the plain forward."""
        return contextlib.nullcontext

    def _autocast(self, enabled: bool | None) -> contextlib.AbstractContextManager:
        device = self.device
        enabled = enabled if enabled is not None else device.type == "cuda"
        if not enabled:
            return contextlib.nullcontext()
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def _forward(
        self,
        model_inputs: dict[str, Any],
        explain: bool = True,
        explainer: Any = None,
        clean_masks: bool = True,
        autocast: bool | None = None,
        channels_last: bool = False,
    ) -> dict[str, Any]:
        """Segment, classify and (with `explain`) explain a batch: the lesion masks come from the model's own
        `predict_lesion_mask` (the one mask path), the explanation from `explainer` (default: fast Grad-CAM)."""
        model = self.model
        pixel_values = model_inputs["pixel_values"]
        if channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        metadata = {key: model_inputs[key] for key in METADATA_KEYS}
        requested = [None if t < 0 else t for t in model_inputs["target_class"].tolist()]
        heatmaps: dict[str, torch.Tensor] = {}
        with self._autocast(autocast):
            with torch.inference_mode(), preserved_model_state(model):
                lesion_mask = model.predict_lesion_mask(pixel_values, clean=clean_masks).float()
            if explain:
                explainer = explainer if explainer is not None else SkinDualNetGradCAM()
                explanation = explainer(
                    model, pixel_values, target_class=requested, lesion_mask=lesion_mask, **metadata
                )
                outputs, targets = explanation.outputs, explanation.target_classes
                heatmaps = explanation.heatmaps
            else:
                with torch.inference_mode(), preserved_model_state(model):
                    outputs = model(pixel_values=pixel_values, lesion_mask=lesion_mask, **metadata)
                targets = [-1] * pixel_values.shape[0]

        def detached(value: torch.Tensor | None) -> torch.Tensor | None:
            return value.detach().float() if value is not None else None

        trust = {key: getattr(outputs, key, None) for key in TRUST_KEYS}
        mask_empty = outputs.mask_empty
        if mask_empty is None:  # no lesion branch: flag it by the same rule the lesion branch uses
            mask_empty = lesion_mask.flatten(1).mean(1) < model.config.min_lesion_fraction
        return {
            "logits": detached(outputs.logits),
            "masks": lesion_mask.detach(),
            "mask_empty": mask_empty.detach().bool(),
            "target_classes": torch.tensor(targets),
            "lesion_pixel_values": detached(outputs.lesion_pixel_values),
            "lesion_boxes": detached(outputs.lesion_boxes),
            **{f"heatmap_{branch}": maps.detach().float() for branch, maps in heatmaps.items()},
            **{key: value.detach() for key, value in trust.items() if value is not None},
            "original": model_inputs["original"],
        }

    def postprocess(self, model_outputs: dict[str, Any], overlay_alpha: float = 0.5) -> dict[str, Any]:
        """One image's result:

        - `probabilities` (label → float), `predicted_label`, `score` (its probability), `target_label` (the class the
          heatmaps explain; None without `explain`);
        - `mask` (bool array at the original size), `mask_empty` (the lesion branch fell back to the full image),
          `mask_fraction`, `mask_overlay` (PIL), `lesion_image` (PIL, what the lesion branch saw; None without a
          lesion branch), `lesion_box` (`[x0, y0, x1, y1]` in original pixels, where the lesion image came from);
        - `heatmaps` and `heatmap_overlays` (per branch `"image"` / `"lesion"`: float32 arrays in [0, 1] at the
          original size, and PIL overlays), `lesion_focus` (per branch: share of heatmap mass inside the mask;
          NaN for an all-zero heatmap); empty dicts without `explain`;
        - `metadata_used` (the fields the model used, as parsed), `metadata_missing` (fields not given or not
          understood), `metadata_ignored` (fields given to a model without a metadata branch);
        - `ood_score` (float) and `in_distribution` (bool): the out-of-distribution gate; `False` means the image
          does not look like the dermoscopic images the model was trained on and its diagnosis should not be trusted
          (both None for a checkpoint without a fitted gate);
        - `malignancy_score` (float: the summed probability of `config.malignant_labels`) and `refer` (bool: the
          score reaches `config.referral_threshold`, the operating point of `config.referral_sensitivity`; None
          without a referral point).
        """
        original = model_outputs["original"]  # collated into a list for `_forward`, un-batched again by transformers
        height, width = original.size
        image = original.image if isinstance(original.image, Image.Image) else rgb_uint8(original.image)
        input_height, input_width = model_outputs["masks"].shape[-2:]
        probabilities = model_outputs["logits"][0].softmax(-1)
        predicted = int(probabilities.argmax())
        target = int(model_outputs["target_classes"].flatten()[0])
        mask = _resize_masks(model_outputs["masks"][:1], (height, width))[0, 0].numpy() > 0.5
        boxes = model_outputs["lesion_boxes"]
        box = boxes[0] if boxes is not None else None
        heatmaps, overlays, focus = {}, {}, {}
        for key, maps in model_outputs.items():
            if not key.startswith("heatmap_"):
                continue
            branch = key.removeprefix("heatmap_")
            branch_box = box if branch == "lesion" else None
            heatmap = heatmap_to_image(maps[0], (height, width), branch_box, (input_height, input_width))
            heatmaps[branch] = heatmap
            overlays[branch] = heatmap_overlay(image, heatmap, overlay_alpha)
            focus[branch] = lesion_focus(heatmap, mask)
        lesion_image = None
        if model_outputs["lesion_pixel_values"] is not None:
            processor = self.image_processor
            lesion_image = pixel_values_to_image(
                model_outputs["lesion_pixel_values"][0], processor.image_mean, processor.image_std
            )
        lesion_box = None
        if box is not None:
            scale = (width / input_width, height / input_height) * 2
            lesion_box = [round(float(v) * s, 2) for v, s in zip(box.tolist(), scale)]
        parsed = original.metadata
        given = [name for name in METADATA_FIELDS if parsed[name] is not None]
        use_metadata = self.model.config.use_metadata
        return {
            "probabilities": {label: float(p) for label, p in zip(self.labels, probabilities.tolist())},
            "predicted_label": self.labels[predicted],
            "score": float(probabilities[predicted]),
            "target_label": self.labels[target] if target >= 0 else None,
            "mask": mask,
            "mask_empty": bool(model_outputs["mask_empty"].flatten()[0]),
            "mask_fraction": float(mask.mean()),
            "mask_overlay": mask_overlay(image, mask),
            "lesion_image": lesion_image,
            "lesion_box": lesion_box,
            "heatmaps": heatmaps,
            "heatmap_overlays": overlays,
            "lesion_focus": focus,
            "metadata_used": {name: parsed[name] for name in given} if use_metadata else {},
            "metadata_missing": [name for name in METADATA_FIELDS if parsed[name] is None],
            "metadata_ignored": [] if use_metadata else given,
            "ood_score": _item(model_outputs.get("ood_score"), float),
            "in_distribution": _item(model_outputs.get("in_distribution"), bool),
            "malignancy_score": _item(model_outputs.get("malignancy_score"), float),
            "refer": _item(model_outputs.get("refer"), bool),
        }


def _item(value: torch.Tensor | None, kind: type) -> Any:
    """One image's entry of a batched `(1,)` output as a Python `kind`, or None when the model gave none."""
    return None if value is None else kind(value.flatten()[0].item())


def register_pipeline() -> None:
    """Register the "skin-lesion-analysis" task with transformers (importing `modeling_skinlesion` does this)."""
    from transformers import AutoModelForImageClassification
    from transformers.pipelines import PIPELINE_REGISTRY

    registered = PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl")
    if registered is not SkinLesionAnalysisPipeline:
        PIPELINE_REGISTRY.register_pipeline(
            TASK,
            pipeline_class=SkinLesionAnalysisPipeline,
            pt_model=AutoModelForImageClassification,
            type="image",
        )


def save_for_hub(
    model: Any, save_directory: str | os.PathLike, image_processor: SkinLesionImageProcessor | None = None
) -> str:
    """Write a Hub-ready folder: weights, `config.json` with `auto_map` (AutoConfig, AutoModel,
    AutoModelForImageClassification) and `custom_pipelines` ("skin-lesion-analysis"), `preprocessor_config.json`, and
    the `*_skinlesion.py` code files flat beside them, so `pipeline("skin-lesion-analysis", model=folder,
    trust_remote_code=True)` works where our package is not installed. Returns the folder."""
    check_dualnet(model)
    register_pipeline()
    pipe = SkinLesionAnalysisPipeline(model=model, image_processor=image_processor, task=TASK, device=model.device)
    pipe.save_pretrained(save_directory)
    return os.fspath(save_directory)


__all__ = [
    "TASK",
    "SkinLesionAnalysisPipeline",
    "SkinLesionOriginal",
    "heatmap_overlay",
    "mask_overlay",
    "pixel_values_to_image",
    "register_pipeline",
    "save_for_hub",
]
