"""The end-to-end skin-dualnet inference entry point and its transformers pipeline ("skin-lesion-analysis").

`SkinLesionAnalyzer` takes images (PIL, numpy, torch, or paths) and optional patient metadata and returns, per image,
the lesion mask and lesion image, class probabilities, Grad-CAM heatmaps of both encoders at the original image size
with their overlays, the lesion-focus score of each heatmap, and flags (empty-mask fallback, metadata used or missing).
`SkinLesionAnalysisPipeline` exposes the same as `pipeline("skin-lesion-analysis", model=..., trust_remote_code=True)`;
`save_for_hub` writes a model folder whose config carries both `auto_map` and `custom_pipelines`, with every code file
flat beside the weights.

Shipped as remote code: imports only torch, transformers, numpy, PIL and its siblings.
"""

import contextlib
import importlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Pipeline, PretrainedConfig
from transformers.utils import logging

from .explaining_skinlesion import (
    FAST_CAM_METHODS,
    SkinDualNetGradCAM,
    heatmap_overlay,
    heatmap_to_image,
    lesion_focus,
    mask_overlay,
    pixel_values_to_image,
    preserved_model_state,
    resolve_target_classes,
)
from .image_processing_skinlesion import SkinLesionImageProcessor, SkinLesionMetadataProcessor, to_rgb_array
from .modeling_skinlesion import SkinDualNet

logger = logging.get_logger(__name__)

TASK = "skin-lesion-analysis"
METADATA_FIELDS = ("age", "sex", "site")


def _metadata_records(metadata: Any, count: int) -> list[Any]:
    """One metadata record (or None) per image: `metadata` may be None, one mapping for every image, a list with one
    mapping (or None) per image, or a pandas DataFrame with one row per image."""
    if metadata is None:
        return [None] * count
    if isinstance(metadata, Mapping):
        return [metadata] * count
    if hasattr(metadata, "to_dict") and hasattr(metadata, "columns"):
        metadata = metadata.to_dict(orient="records")
    if isinstance(metadata, (list, tuple)):
        if len(metadata) != count:
            raise ValueError(
                f"`metadata` holds {len(metadata)} records for {count} images; pass one per image (None where "
                "unknown), or a single mapping for all."
            )
        return list(metadata)
    raise ValueError(
        f"`metadata` must be a mapping such as {{'age': 55, 'sex': 'female', 'site': 'back'}}, a list of them, or a "
        f"DataFrame, got {type(metadata).__name__}."
    )


def _resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Binary masks `(batch_size, 1, h, w)` resized as `post_process_masks` does (bilinear, then > 0.5)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return (F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False) > 0.5).float()


def make_explainer(method: str = "gradcam", backend: str = "fast") -> Any:
    """The Grad-CAM explainer for `method` on `backend` ("fast", "library" or "auto"; see `SkinLesionAnalyzer`)."""
    if backend not in ("fast", "library", "auto"):
        raise ValueError(f"`explain_backend` must be 'fast', 'library' or 'auto', got {backend!r}.")
    if backend == "fast" or (backend == "auto" and method in FAST_CAM_METHODS):
        return SkinDualNetGradCAM(method)
    try:
        # Imported by name: the library backend belongs to the installed package, not to the remote-code folder.
        explain = importlib.import_module("modeling_skinlesion.explain")
    except ImportError as error:
        raise ImportError(
            f"The pytorch-grad-cam backend needs the skin-dualnet package and grad-cam (`pip install grad-cam`); "
            f"without them use the fast backend, which offers {list(FAST_CAM_METHODS)}."
        ) from error
    return explain.SkinDualNetLibraryCAM(method)


class SkinLesionAnalyzer:
    r"""
    Segment, classify and explain dermoscopic images with a [`SkinDualNet`] checkpoint.

    Args:
        model ([`SkinDualNet`]):
            The classifier (with its nested segmenter). Put it in eval mode; the analyzer runs it in eval mode either
            way and restores the mode it found.
        image_processor ([`SkinLesionImageProcessor`], *optional*):
            The classifier's processor; built from `model.config` when omitted. The lesion masks come from the
            model's own `predict_lesion_mask` on the processed images (the one mask path).
        method (`str`, *optional*, defaults to `"gradcam"`):
            CAM method: one of `FAST_CAM_METHODS` for the fast backend, or any of
            `modeling_skinlesion.explain.LIBRARY_CAM_METHODS` for the library backend.
        explain_backend (`str`, *optional*, defaults to `"fast"`):
            `"fast"` (one forward, gradients down to the hooked layers only; pure torch, also in remote code),
            `"library"` (pytorch-grad-cam, one call per branch, the straightforward way; needs the skin-dualnet package
            and `grad-cam`), or `"auto"` (fast when it has `method`, else the library).
        explainer (*optional*):
            A ready explainer (`SkinDualNetGradCAM`, `SkinDualNetLibraryCAM` or anything with their call signature);
            overrides `method` and `explain_backend`.
        device (`str` or `torch.device`, *optional*):
            Move the model there; by default it stays where it is.
        autocast (`bool`, *optional*):
            Run the forwards under bf16 (fp16 where bf16 is missing) autocast; default: on CUDA only.
        channels_last (`bool`, *optional*, defaults to `False`):
            Convert the model and its inputs to channels-last memory format.
        clean_masks (`bool`, *optional*, defaults to `True`):
            Keep the largest lesion component and fill holes (`post_process_masks`) before building the lesion image.
        overlay_alpha (`float`, *optional*, defaults to 0.5):
            Weight of the heatmap colours in the overlays.

    Example:
        >>> analyzer = SkinLesionAnalyzer.from_pretrained("path/to/skin-dualnet")
        >>> result = analyzer("ISIC_0024306.jpg", metadata={"age": 45, "sex": "male", "site": "back"})
        >>> result["predicted_label"], result["lesion_focus"]["lesion"], result["mask_empty"]
    """

    def __init__(
        self,
        model: Any,
        image_processor: SkinLesionImageProcessor | None = None,
        method: str = "gradcam",
        explain_backend: str = "fast",
        explainer: Any = None,
        device: str | torch.device | None = None,
        autocast: bool | None = None,
        channels_last: bool = False,
        clean_masks: bool = True,
        overlay_alpha: float = 0.5,
    ):
        if getattr(getattr(model, "config", None), "model_type", None) != "skin_dualnet":
            raise ValueError(
                f"`model` must be a SkinDualNet (config.model_type 'skin_dualnet'), got {type(model).__name__}."
            )
        if not 0.0 <= overlay_alpha <= 1.0:
            raise ValueError(f"`overlay_alpha` must lie in [0, 1], got {overlay_alpha}.")
        if device is not None:
            model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.image_processor = image_processor or SkinLesionImageProcessor.from_model_config(model.config)
        self.metadata_processor = SkinLesionMetadataProcessor.from_config(model.config)
        self.explainer = explainer if explainer is not None else make_explainer(method, explain_backend)
        self.autocast = autocast
        self.channels_last = channels_last
        self.clean_masks = clean_masks
        self.overlay_alpha = overlay_alpha
        self.labels = [model.config.id2label[i] for i in sorted(model.config.id2label)]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "SkinLesionAnalyzer":
        """Load a SkinDualNet checkpoint (folder or Hub id) and its image processor; `kwargs` go to `__init__`."""
        config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path)
        if config_dict.get("model_type") != "skin_dualnet":
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {config_dict.get('model_type')!r} model, not a skin-dualnet "
                "classifier (model_type 'skin_dualnet')."
            )
        model = SkinDualNet.from_pretrained(pretrained_model_name_or_path).eval()
        try:
            processor = SkinLesionImageProcessor.from_pretrained(pretrained_model_name_or_path)
        except OSError:
            processor = None
        return cls(model, processor, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self) -> contextlib.AbstractContextManager:
        device = self.device
        enabled = self.autocast if self.autocast is not None else device.type == "cuda"
        if not enabled:
            return contextlib.nullcontext()
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device)
        if self.channels_last and tensor.ndim == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def __call__(
        self,
        images: Any,
        metadata: Any = None,
        target_class: Any = None,
        explain: bool = True,
        batch_size: int = 8,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        r"""
        images:
            One image (PIL, numpy or torch array, or file path) or a list of them.
        metadata:
            None, one mapping for every image, or one per image (`{"age": 55, "sex": "female", "site": "back"}`; the
            site may also be given as `anatom_site_general` or `localization`).
        target_class:
            The class to explain: None (the predicted one), a label name or index, or one per image.
        explain (`bool`, *optional*, defaults to `True`):
            Compute the heatmaps, their overlays and the lesion-focus scores.
        batch_size (`int`, *optional*, defaults to 8):
            Images per forward pass.

        Returns:
            A dict for one image, a list of dicts for a list: see `finish`.
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if not items:
            raise ValueError("`images` is empty; pass at least one image.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        records = _metadata_records(metadata, len(items))
        targets = resolve_target_classes(target_class, self.model.config.id2label, len(items))
        results = []
        for start in range(0, len(items), batch_size):
            end = start + batch_size
            batch = self.prepare(items[start:end], records[start:end])
            raw = self.run(batch, target_class=targets[start:end], explain=explain)
            results.extend(self.finish(raw))
        return results[0] if single else results

    def prepare(self, images: list[Any], records: list[Any] | None = None) -> dict[str, Any]:
        """Load and pre-process a batch: processed tensors for the classifier and the segmenter, metadata tensors,
        and what `finish` needs (the original images as uint8 RGB, their sizes, the parsed metadata)."""
        records = records if records is not None else [None] * len(images)
        if len(records) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(records)} metadata records.")
        names = [
            os.fspath(im) if isinstance(im, (str, os.PathLike)) else f"images[{i}]" for i, im in enumerate(images)
        ]
        arrays = [to_rgb_array(image, name) for image, name in zip(images, names)]
        pixel_values = self.image_processor.preprocess(arrays, return_tensors="pt")["pixel_values"]
        parsed = [self.metadata_processor.normalize_record(record) for record in records]
        metadata = self.metadata_processor(records, batch_size=len(records))
        return {
            "pixel_values": pixel_values,
            "age": metadata["age"],
            "sex_ids": metadata["sex_ids"],
            "site_ids": metadata["site_ids"],
            "images": [(array * 255.0 + 0.5).astype(np.uint8) for array in arrays],
            "metadata": parsed,
        }

    def segment(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Binary lesion masks `(batch_size, 1, h, w)` (float, on the device) at the classifier's input size, from
        the model's own mask path (`SkinDualNet.predict_lesion_mask`: segmenter, then largest component and holes
        filled unless `clean_masks=False`), so the pipelines, evaluation and training see the same masks."""
        with torch.inference_mode(), self._autocast(), preserved_model_state(self.model):
            return self.model.predict_lesion_mask(pixel_values, clean=self.clean_masks).float()

    def run(
        self, batch: dict[str, Any], target_class: Any = None, explain: bool = True, explainer: Any = None
    ) -> dict[str, Any]:
        """Segment, classify and (with `explain`) compute the heatmaps of a prepared batch. Returns CPU tensors."""
        model = self.model
        pixel_values = self._to_device(batch["pixel_values"])
        lesion_mask = self.segment(pixel_values)
        masks = lesion_mask.cpu()
        metadata = {key: batch[key].to(self.device) for key in ("age", "sex_ids", "site_ids")}
        heatmaps: dict[str, torch.Tensor] = {}
        if explain:
            explainer = explainer if explainer is not None else self.explainer
            with self._autocast():
                explanation = explainer(
                    model, pixel_values, target_class=target_class, lesion_mask=lesion_mask, **metadata
                )
            outputs, targets = explanation.outputs, explanation.target_classes
            heatmaps = {branch: maps.float().cpu() for branch, maps in explanation.heatmaps.items()}
        else:
            with torch.inference_mode(), self._autocast(), preserved_model_state(model):
                outputs = model(pixel_values=pixel_values, lesion_mask=lesion_mask, **metadata)
            targets = [None] * pixel_values.shape[0]

        def cpu(value: torch.Tensor | None) -> torch.Tensor | None:
            return value.detach().float().cpu() if value is not None else None

        mask_empty = outputs.mask_empty
        if mask_empty is None:  # no lesion branch: flag it by the same rule the lesion branch uses
            mask_empty = lesion_mask.flatten(1).mean(1) < model.config.min_lesion_fraction
        return {
            "images": batch["images"],
            "metadata": batch["metadata"],
            "input_size": tuple(pixel_values.shape[-2:]),
            "masks": masks,
            "logits": cpu(outputs.logits),
            "lesion_pixel_values": cpu(outputs.lesion_pixel_values),
            "lesion_boxes": cpu(outputs.lesion_boxes),
            "mask_empty": mask_empty.detach().cpu().bool(),
            "target_classes": targets,
            "heatmaps": heatmaps,
        }

    def finish(self, raw: dict[str, Any]) -> list[dict[str, Any]]:
        """Per image, a dict with:

        - `probabilities` (label → float), `predicted_label`, `score` (its probability), `target_label` (the class the
          heatmaps explain; None without `explain`);
        - `mask` (bool array at the original size), `mask_empty` (the lesion branch fell back to the full image),
          `mask_overlay` (PIL), `lesion_image` (PIL, what the lesion branch saw; None without a lesion branch),
          `lesion_box` (`[x0, y0, x1, y1]` in original pixels, where the lesion image came from);
        - `heatmaps` and `heatmap_overlays` (per branch `"image"` / `"lesion"`: float32 arrays in [0, 1] at the
          original size, and PIL overlays), `lesion_focus` (per branch: share of heatmap mass inside the mask;
          NaN for an all-zero heatmap); empty dicts without `explain`;
        - `metadata_used` (the fields the model used, as parsed), `metadata_missing` (fields not given or not
          understood), `metadata_ignored` (fields given to a model without a metadata branch).
        """
        config = self.model.config
        input_height, input_width = raw["input_size"]
        probabilities = raw["logits"].softmax(-1)
        results = []
        for i, image in enumerate(raw["images"]):
            height, width = image.shape[:2]
            mask = _resize_masks(raw["masks"][i : i + 1], (height, width))[0, 0].numpy() > 0.5
            probs = probabilities[i]
            predicted = int(probs.argmax())
            target = raw["target_classes"][i]
            box = raw["lesion_boxes"][i] if raw["lesion_boxes"] is not None else None
            heatmaps, overlays, focus = {}, {}, {}
            for branch, maps in raw["heatmaps"].items():
                branch_box = box if branch == "lesion" else None
                heatmap = heatmap_to_image(maps[i], (height, width), branch_box, (input_height, input_width))
                heatmaps[branch] = heatmap
                overlays[branch] = heatmap_overlay(image, heatmap, self.overlay_alpha)
                focus[branch] = lesion_focus(heatmap, mask)
            lesion_image = None
            if raw["lesion_pixel_values"] is not None:
                processor = self.image_processor
                lesion_image = pixel_values_to_image(
                    raw["lesion_pixel_values"][i], processor.image_mean, processor.image_std
                )
            lesion_box = None
            if box is not None:
                scale = (width / input_width, height / input_height) * 2
                lesion_box = [round(float(v) * s, 2) for v, s in zip(box.tolist(), scale)]
            parsed = raw["metadata"][i]
            given = [name for name in METADATA_FIELDS if parsed[name] is not None]
            results.append(
                {
                    "probabilities": {label: float(p) for label, p in zip(self.labels, probs.tolist())},
                    "predicted_label": self.labels[predicted],
                    "score": float(probs[predicted]),
                    "target_label": self.labels[target] if target is not None else None,
                    "mask": mask,
                    "mask_empty": bool(raw["mask_empty"][i]),
                    "mask_fraction": float(mask.mean()),
                    "mask_overlay": mask_overlay(image, mask),
                    "lesion_image": lesion_image,
                    "lesion_box": lesion_box,
                    "heatmaps": heatmaps,
                    "heatmap_overlays": overlays,
                    "lesion_focus": focus,
                    "metadata_used": {name: parsed[name] for name in given} if config.use_metadata else {},
                    "metadata_missing": [name for name in METADATA_FIELDS if parsed[name] is None],
                    "metadata_ignored": [] if config.use_metadata else given,
                }
            )
        return results


class SkinLesionAnalysisPipeline(Pipeline):
    """transformers pipeline for the "skin-lesion-analysis" task: a thin shell over [`SkinLesionAnalyzer`].

    Inputs: an image (PIL, array, path or URL-free file path), a dict `{"image": ..., "metadata": {...}}`, or a list of
    either. Call arguments: `metadata` (applies to every image given without its own), `target_class`, `explain`
    (default True), `method` (a fast Grad-CAM method, default "gradcam"), `batch_size` (images per forward for lists).
    Each image gives the dict described in `SkinLesionAnalyzer.finish`.

    Example:
        >>> from transformers import pipeline
        >>> analyze = pipeline("skin-lesion-analysis", model="path/to/folder", trust_remote_code=True)
        >>> analyze("lesion.jpg", metadata={"age": 60, "sex": "female", "site": "face"})["probabilities"]
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.analyzer = SkinLesionAnalyzer(self.model, self.image_processor)
        self._explainers: dict[str, SkinDualNetGradCAM] = {}

    def _sanitize_parameters(
        self,
        metadata: Any = None,
        target_class: Any = None,
        explain: bool | None = None,
        method: str | None = None,
        **kwargs: Any,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        if kwargs:
            raise ValueError(
                f"Unknown argument(s) {sorted(kwargs)} for the {TASK} pipeline; it accepts metadata, target_class, "
                "explain, method and batch_size."
            )
        preprocess = {"metadata": metadata} if metadata is not None else {}
        forward = {}
        if target_class is not None:
            if not isinstance(target_class, (list, tuple)):
                resolve_target_classes(target_class, self.model.config.id2label, 1)  # fail before any work
            forward["target_class"] = target_class
        if explain is not None:
            forward["explain"] = bool(explain)
        if method is not None:
            forward["explainer"] = self._explainer(method)
        return preprocess, forward, {}

    def _explainer(self, method: str) -> SkinDualNetGradCAM:
        if not hasattr(self, "_explainers"):
            self._explainers = {}
        if method not in self._explainers:
            self._explainers[method] = SkinDualNetGradCAM(method)
        return self._explainers[method]

    @staticmethod
    def _split(inputs: Any, metadata: Any) -> tuple[Any, Any]:
        if isinstance(inputs, Mapping):
            if "image" not in inputs:
                raise ValueError(
                    f"A dict input needs an 'image' key (and optionally 'metadata'), got {sorted(inputs)}."
                )
            return inputs["image"], inputs.get("metadata", metadata)
        return inputs, metadata

    def preprocess(self, inputs: Any, metadata: Any = None) -> dict[str, Any]:
        image, record = self._split(inputs, metadata)
        if record is not None and not isinstance(record, Mapping):
            raise ValueError(f"`metadata` for one image must be a mapping, got {type(record).__name__}.")
        return self.analyzer.prepare([image], [record])

    def _forward(
        self, model_inputs: dict[str, Any], target_class: Any = None, explain: bool = True, explainer: Any = None
    ) -> dict[str, Any]:
        return self.analyzer.run(model_inputs, target_class=target_class, explain=explain, explainer=explainer)

    def postprocess(self, model_outputs: dict[str, Any]) -> dict[str, Any]:
        return self.analyzer.finish(model_outputs)[0]

    def __call__(self, inputs: Any, batch_size: int | None = None, **kwargs: Any) -> Any:
        """One input gives one result dict; a list gives a list, run `batch_size` images per forward."""
        if not isinstance(inputs, (list, tuple)):
            return super().__call__(inputs, **kwargs)
        batch_size = batch_size or self._batch_size or 1
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        preprocess, forward, _ = self._sanitize_parameters(**kwargs)
        pairs = [self._split(item, preprocess.get("metadata")) for item in inputs]
        results = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = self.analyzer.prepare([image for image, _ in chunk], [record for _, record in chunk])
            results.extend(self.analyzer.finish(self.analyzer.run(batch, **forward)))
        return results


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
    every code file flat beside them, so `pipeline("skin-lesion-analysis", model=folder, trust_remote_code=True)` works
    where our package is not installed. Returns the folder."""
    if getattr(getattr(model, "config", None), "model_type", None) != "skin_dualnet":
        raise ValueError(f"`model` must be a SkinDualNet, got {type(model).__name__}.")
    register_pipeline()
    processor = image_processor or SkinLesionImageProcessor.from_model_config(model.config)
    pipe = SkinLesionAnalysisPipeline(model=model, image_processor=processor, task=TASK, device=model.device)
    pipe.save_pretrained(save_directory)
    return os.fspath(save_directory)


__all__ = [
    "TASK",
    "SkinLesionAnalyzer",
    "SkinLesionAnalysisPipeline",
    "make_explainer",
    "register_pipeline",
    "save_for_hub",
]
