"""Package-only: `SkinLesionAnalyzer`, a thin convenience over the "skin-lesion-analysis" pipeline.

It adds what the pipeline's call does not take: per-image lists of metadata records (or a DataFrame) and of target
classes, the pytorch-grad-cam backend chosen by name (`explain_backend`, through `grad_cam_backend.get_explainer`), and
loading a checkpoint with our own classes. Every image still goes through `SkinLesionAnalysisPipeline`'s preprocess →
_forward → postprocess, batched by transformers, so both give the same result dicts.
"""

import os
from typing import Any

import torch
from transformers import AutoConfig

from .explaining_skinlesion import check_dualnet, resolve_target_classes
from .grad_cam_backend import get_explainer
from .image_processing_skinlesion import SkinLesionImageProcessor, metadata_records
from .modeling_skinlesion import SkinDualNet
from .pipeline_skinlesion import TASK, SkinLesionAnalysisPipeline


class SkinLesionAnalyzer:
    r"""
    Segment, classify and explain dermoscopic images with a [`SkinDualNet`] checkpoint.

    Args:
        model ([`SkinDualNet`]):
            The classifier (with its nested segmenter). The analysis runs it in eval mode and restores its mode.
        image_processor ([`SkinLesionImageProcessor`], *optional*):
            The classifier's processor; built from `model.config` when omitted.
        method (`str`, *optional*, defaults to `"gradcam"`):
            CAM method: one of `FAST_CAM_METHODS` for the fast backend, or any of
            `modeling_skinlesion.grad_cam_backend.LIBRARY_CAM_METHODS` for the library backend.
        explain_backend (`str`, *optional*, defaults to `"fast"`):
            `"fast"` (one forward, gradients down to the hooked layers only), `"library"` (pytorch-grad-cam, one call
            per branch; needs `grad-cam`), or `"auto"` (fast when it has `method`, else the library).
        explainer (*optional*):
            A ready explainer; overrides `method` and `explain_backend`.
        device (`str` or `torch.device`, *optional*):
            Move the model there; by default it stays where it is.
        autocast (`bool`, *optional*):
            Run the forwards under bf16 (fp16 where bf16 is missing) autocast; default: on CUDA only.
        channels_last (`bool`, *optional*, defaults to `False`):
            Convert the model and its inputs to channels-last memory format.
        clean_masks (`bool`, *optional*, defaults to `True`):
            Keep the largest lesion component and fill holes before building the lesion image.
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
        check_dualnet(model)
        if device is not None:
            model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.explainer = explainer if explainer is not None else get_explainer(method, explain_backend)
        self.pipeline = SkinLesionAnalysisPipeline(
            model=model,
            image_processor=image_processor,
            task=TASK,
            device=next(model.parameters()).device,
            explainer=self.explainer,
            autocast=autocast,
            channels_last=channels_last,
            clean_masks=clean_masks,
            overlay_alpha=overlay_alpha,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "SkinLesionAnalyzer":
        """Load a SkinDualNet checkpoint (folder or Hub id) and its image processor; `kwargs` go to `__init__`."""
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
        check_dualnet(config, os.fspath(pretrained_model_name_or_path))
        model = SkinDualNet.from_pretrained(pretrained_model_name_or_path, config=config).eval()
        try:
            processor = SkinLesionImageProcessor.from_pretrained(pretrained_model_name_or_path)
        except OSError:
            processor = None
        return cls(model, processor, **kwargs)

    @property
    def model(self) -> SkinDualNet:
        return self.pipeline.model

    @property
    def image_processor(self) -> SkinLesionImageProcessor:
        return self.pipeline.image_processor

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

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
            None, one mapping for every image, one per image (a list, None where unknown), or a DataFrame with one
            row per image (`{"age": 55, "sex": "female", "site": "back"}`; the site may also be given as
            `anatom_site_general` or `localization`).
        target_class:
            The class to explain: None (the predicted one), a label name or index, or one per image.
        explain (`bool`, *optional*, defaults to `True`):
            Compute the heatmaps, their overlays and the lesion-focus scores.
        batch_size (`int`, *optional*, defaults to 8):
            Images per forward pass.

        Returns:
            A dict for one image, a list of dicts for a list: see `SkinLesionAnalysisPipeline.postprocess`.
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if not items:
            raise ValueError("`images` is empty; pass at least one image.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        records = metadata_records(metadata, len(items))
        targets = resolve_target_classes(target_class, self.model.config.id2label, len(items))
        inputs = [
            {"image": image, "metadata": record, "target_class": target}
            for image, record, target in zip(items, records, targets)
        ]
        results = self.pipeline(inputs, explain=explain, batch_size=batch_size)
        return results[0] if single else results


__all__ = ["SkinLesionAnalyzer"]
