"""skin-dualnet: explainable skin-lesion analysis (Deep-UNet segmenter + dual-encoder metadata classifier).

`import modeling_skinlesion` is lazy, as `import transformers` is: it imports nothing heavy (no torch, transformers,
timm), and each name below is imported on first use. The first use of any of them also registers the models with the
transformers Auto classes (`AutoConfig`, `AutoModel`, `AutoModelForImageClassification`,
`AutoModelForSemanticSegmentation`, `AutoImageProcessor` resolve them without `trust_remote_code`), registers the
"skin-lesion-analysis" pipeline, and makes `save_pretrained` write the `auto_map` and copy the code for remote
loading. To register without touching a class, call `modeling_skinlesion.register()`; when transformers is already
imported, `import modeling_skinlesion` registers at once (it then costs only this package's own modules).

Remote-code boundary: the `*_skinlesion.py` modules (configuration, modeling, image_processing, explaining, pipeline,
segmentation, fusion, pretrained) are the files shipped to the Hub as remote code and import only each other plus
torch / transformers / timm / numpy / PIL and the standard library; every other module (`analyzer`,
`grad_cam_backend`, `data`, `metrics`, `model_card`, `hub`, `trust`, `cli`, `training`) is package-only.
"""

import importlib
import sys
from typing import TYPE_CHECKING, Any

# Public name → the submodule that defines it.
_LAZY_NAMES = {
    "SkinLesionAnalyzer": "analyzer",
    "SkinDualNetConfig": "configuration_skinlesion",
    "SkinLesionSegmenterConfig": "configuration_skinlesion",
    "SkinLesionImageProcessor": "image_processing_skinlesion",
    "SkinLesionMetadataProcessor": "image_processing_skinlesion",
    "load_image": "image_processing_skinlesion",
    "SkinDualNet": "modeling_skinlesion",
    "SkinDualNetOutput": "modeling_skinlesion",
    "SkinLesionSegmenter": "modeling_skinlesion",
    "SkinLesionSegmenterOutput": "modeling_skinlesion",
    "build_lesion_image": "modeling_skinlesion",
    "SkinLesionAnalysisPipeline": "pipeline_skinlesion",
    "register_pipeline": "pipeline_skinlesion",
    "save_for_hub": "pipeline_skinlesion",
}

_registered = False


def register() -> None:
    """Register the configs, models, image processor and the "skin-lesion-analysis" pipeline with transformers (the
    Auto classes and `pipeline()`); idempotent. Called on the first use of any public name of the package."""
    global _registered
    if _registered:
        return
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageClassification,
        AutoModelForSemanticSegmentation,
    )

    from .configuration_skinlesion import SkinDualNetConfig, SkinLesionSegmenterConfig
    from .image_processing_skinlesion import SkinLesionImageProcessor
    from .modeling_skinlesion import SkinDualNet, SkinLesionSegmenter
    from .pipeline_skinlesion import register_pipeline

    AutoConfig.register(SkinLesionSegmenterConfig.model_type, SkinLesionSegmenterConfig, exist_ok=True)
    AutoConfig.register(SkinDualNetConfig.model_type, SkinDualNetConfig, exist_ok=True)
    AutoModel.register(SkinLesionSegmenterConfig, SkinLesionSegmenter, exist_ok=True)
    AutoModel.register(SkinDualNetConfig, SkinDualNet, exist_ok=True)
    AutoModelForSemanticSegmentation.register(SkinLesionSegmenterConfig, SkinLesionSegmenter, exist_ok=True)
    AutoModelForImageClassification.register(SkinDualNetConfig, SkinDualNet, exist_ok=True)
    for config in (SkinLesionSegmenterConfig, SkinDualNetConfig):
        AutoImageProcessor.register(
            config,
            image_processor_classes={"pil": SkinLesionImageProcessor, "torchvision": SkinLesionImageProcessor},
            exist_ok=True,
        )
    SkinLesionSegmenterConfig.register_for_auto_class()
    SkinDualNetConfig.register_for_auto_class()
    SkinLesionSegmenter.register_for_auto_class("AutoModel")
    SkinDualNet.register_for_auto_class("AutoModel")
    SkinLesionImageProcessor.register_for_auto_class("AutoImageProcessor")
    register_pipeline()  # the "skin-lesion-analysis" task
    _registered = True


def __getattr__(name: str) -> Any:
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    register()
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY_NAMES])


if TYPE_CHECKING:  # for type checkers and IDEs: the names as eager imports  # noqa: F401
    from .analyzer import SkinLesionAnalyzer  # noqa: F401
    from .configuration_skinlesion import SkinDualNetConfig, SkinLesionSegmenterConfig  # noqa: F401
    from .image_processing_skinlesion import SkinLesionImageProcessor, SkinLesionMetadataProcessor, load_image  # noqa: F401
    from .modeling_skinlesion import (  # noqa: F401
        SkinDualNet,
        SkinDualNetOutput,
        SkinLesionSegmenter,
        SkinLesionSegmenterOutput,
        build_lesion_image,
    )
    from .pipeline_skinlesion import SkinLesionAnalysisPipeline, register_pipeline, save_for_hub  # noqa: F401

# Imported after transformers (the usual order in a notebook: `from transformers import pipeline`, then this
# package), register at once, so `pipeline("skin-lesion-analysis")` and the Auto classes work without a class touched.
if "transformers.models.auto" in sys.modules:
    register()

__all__ = ["register", *_LAZY_NAMES]
