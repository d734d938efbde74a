"""skin-dualnet: explainable skin-lesion analysis (Deep-UNet segmenter + dual-encoder metadata classifier).

Importing the package registers the models with the transformers Auto classes, so `AutoConfig`, `AutoModel`,
`AutoModelForImageClassification`, `AutoModelForSemanticSegmentation` and `AutoImageProcessor` resolve them without
`trust_remote_code`, registers the "skin-lesion-analysis" pipeline, and `save_pretrained` writes the `auto_map` and
copies the code for remote loading.

Remote-code boundary: the `*_skinlesion.py` modules (configuration, modeling, image_processing, explaining, pipeline)
are the files shipped to the Hub as remote code and import only each other plus torch / transformers / timm / numpy /
PIL and the standard library; every other module (`analyzer`, `grad_cam_backend`, `data`, `metrics`, `model_card`,
`hub`) is package-only.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
)

from .analyzer import SkinLesionAnalyzer
from .configuration_skinlesion import SkinDualNetConfig, SkinLesionSegmenterConfig
from .image_processing_skinlesion import SkinLesionImageProcessor, SkinLesionMetadataProcessor, load_image
from .modeling_skinlesion import (
    SkinDualNet,
    SkinDualNetOutput,
    SkinLesionSegmenter,
    SkinLesionSegmenterOutput,
    build_lesion_image,
)
from .pipeline_skinlesion import SkinLesionAnalysisPipeline, register_pipeline, save_for_hub

AutoConfig.register(SkinLesionSegmenterConfig.model_type, SkinLesionSegmenterConfig, exist_ok=True)
AutoConfig.register(SkinDualNetConfig.model_type, SkinDualNetConfig, exist_ok=True)
AutoModel.register(SkinLesionSegmenterConfig, SkinLesionSegmenter, exist_ok=True)
AutoModel.register(SkinDualNetConfig, SkinDualNet, exist_ok=True)
AutoModelForSemanticSegmentation.register(SkinLesionSegmenterConfig, SkinLesionSegmenter, exist_ok=True)
AutoModelForImageClassification.register(SkinDualNetConfig, SkinDualNet, exist_ok=True)
for _config in (SkinLesionSegmenterConfig, SkinDualNetConfig):
    AutoImageProcessor.register(
        _config,
        image_processor_classes={"pil": SkinLesionImageProcessor, "torchvision": SkinLesionImageProcessor},
        exist_ok=True,
    )

SkinLesionSegmenterConfig.register_for_auto_class()
SkinDualNetConfig.register_for_auto_class()
SkinLesionSegmenter.register_for_auto_class("AutoModel")
SkinDualNet.register_for_auto_class("AutoModel")
SkinLesionImageProcessor.register_for_auto_class("AutoImageProcessor")
register_pipeline()  # the "skin-lesion-analysis" task

__all__ = [
    "SkinLesionSegmenterConfig",
    "SkinDualNetConfig",
    "SkinLesionSegmenter",
    "SkinLesionSegmenterOutput",
    "SkinDualNet",
    "SkinDualNetOutput",
    "SkinLesionImageProcessor",
    "SkinLesionMetadataProcessor",
    "build_lesion_image",
    "SkinLesionAnalyzer",
    "SkinLesionAnalysisPipeline",
    "load_image",
    "register_pipeline",
    "save_for_hub",
]
