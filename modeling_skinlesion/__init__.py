"""skin-dualnet: explainable skin-lesion analysis (Deep-UNet segmenter + dual-encoder metadata classifier).

Importing the package registers the models with the transformers Auto classes, so `AutoConfig`, `AutoModel`,
`AutoModelForImageClassification`, `AutoModelForSemanticSegmentation` and `AutoImageProcessor` resolve them without
`trust_remote_code`, and `save_pretrained` writes the `auto_map` and copies the code for remote loading.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
)

from .configuration_skinlesion import SkinDualNetConfig, SkinLesionSegmenterConfig
from .image_processing_skinlesion import SkinLesionImageProcessor, SkinLesionMetadataProcessor
from .modeling_skinlesion import (
    SkinDualNet,
    SkinDualNetOutput,
    SkinLesionSegmenter,
    SkinLesionSegmenterOutput,
    build_lesion_image,
)
from .pipeline_skinlesion import SkinLesionAnalysisPipeline, SkinLesionAnalyzer, register_pipeline, save_for_hub

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
    "save_for_hub",
]
