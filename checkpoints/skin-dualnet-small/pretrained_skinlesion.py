"""What the segmenter and the classifier share: input checks, the timm trunk factory and the `PreTrainedModel` base
(weight initialisation, output options, gradient checkpointing, `save_pretrained`)."""

import math

import timm
import torch
from timm.models import FeatureInfo
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer


# --------------------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------------------
def check_pixel_values(pixel_values: torch.Tensor | None, min_size: int, name: str = "pixel_values") -> None:
    """Raise a `ValueError` naming `name` unless it is a float `(batch_size, 3, height, width)` tensor whose sides are
    at least `min_size` (the encoder's total stride)."""
    if pixel_values is None:
        raise ValueError(f"`{name}` is required; pre-process images with `SkinLesionImageProcessor`.")
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(pixel_values).__name__}.")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(
            f"`{name}` must have shape (batch_size, 3, height, width), got {tuple(pixel_values.shape)}; "
            "pre-process images with `SkinLesionImageProcessor`."
        )
    if not pixel_values.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got {pixel_values.dtype}.")
    height, width = pixel_values.shape[-2:]
    if min(height, width) < min_size:
        raise ValueError(
            f"`{name}` is {height}x{width}, smaller than the encoder's total stride ({min_size}); "
            f"images must be at least {min_size}x{min_size}."
        )


def check_mask(mask: torch.Tensor, name: str, pixel_values: torch.Tensor) -> torch.Tensor:
    """Return `mask` as `(batch_size, 1, height, width)` float, or raise naming `name`."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(mask).__name__}.")
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    expected = (pixel_values.shape[0], 1, *pixel_values.shape[-2:])
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(
            f"`{name}` must have shape {expected} or {expected[:1] + expected[2:]}, got {tuple(mask.shape)}."
        )
    if mask.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"`{name}` has batch size {mask.shape[0]} but `pixel_values` has {pixel_values.shape[0]}; "
            "pass one mask per image."
        )
    if mask.shape[-2:] != pixel_values.shape[-2:]:
        raise ValueError(
            f"`{name}` is {tuple(mask.shape[-2:])} but `pixel_values` is {tuple(pixel_values.shape[-2:])}; "
            "resize the mask to the processed image size (the image processor does this when given `masks`)."
        )
    return mask.to(pixel_values.dtype)


def check_batch(tensor: torch.Tensor | None, name: str, batch_size: int) -> None:
    """Raise a `ValueError` naming `name` unless it is None or a 1-D tensor of `batch_size` entries."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 1:
        raise ValueError(
            f"`{name}` must be a 1-D tensor of shape (batch_size,), got "
            f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}; "
            "build metadata with `SkinLesionMetadataProcessor`."
        )
    if tensor.shape[0] != batch_size:
        raise ValueError(f"`{name}` has batch size {tensor.shape[0]} but `pixel_values` has {batch_size}.")


# --------------------------------------------------------------------------------------------------------------------
# timm trunks
# --------------------------------------------------------------------------------------------------------------------
def create_timm_trunk(name: str, pretrained: bool = False, features_only: bool = False) -> nn.Module:
    """A timm trunk without classifier head. Its modules are flagged so `_init_weights` keeps timm's initialisation."""
    kwargs = {"features_only": True} if features_only else {"num_classes": 0, "global_pool": ""}
    trunk = timm.create_model(name, pretrained=pretrained, **kwargs)
    for module in trunk.modules():
        module._skinlesion_timm = True
    trunk._skinlesion_trunk = True
    return trunk


def trunk_stride(trunk: nn.Module) -> int:
    """Total stride of a timm trunk's last feature map, from timm's `feature_info` (a `FeatureInfo` for
    `features_only` trunks, a list of dicts for the others)."""
    info = trunk.feature_info
    return info.reduction()[-1] if isinstance(info, FeatureInfo) else info[-1]["reduction"]


def check_image_size(image_size: int, stride: int, field: str = "image_size") -> None:
    """The configured input must hold at least one cell of the trunk's last feature map."""
    if image_size < stride:
        raise ValueError(
            f"`{field}` must be at least {stride} (the encoder's total stride, from timm's `feature_info`), "
            f"got {image_size}."
        )


# --------------------------------------------------------------------------------------------------------------------
# Pre-trained model base
# --------------------------------------------------------------------------------------------------------------------
class SkinLesionPreTrainedModel(PreTrainedModel):
    """Weight initialisation and Hub plumbing shared by the segmenter and the classifier."""

    base_model_prefix = "skinlesion"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # Blocks accelerate's `device_map` must keep on one device (a residual block's parts read each other's outputs).
    _no_split_modules = [
        "SkinDualNetCrossAttentionLayer",
        "SkinDualNetMetadataLayer",
        "SkinLesionASPP",
        "SkinLesionDecoderBlock",
    ]
    _extra_auto_classes: tuple[str, ...] = ()

    def _output_options(self, kwargs: dict) -> tuple[bool, bool]:
        """`output_attentions` and `output_hidden_states` from the forward's keyword arguments, defaulting to the
        config's (`return_dict` is handled by transformers' `can_return_tuple`)."""
        options = [kwargs.get(name) for name in ("output_attentions", "output_hidden_states")]
        defaults = (self.config.output_attentions, self.config.output_hidden_states)
        return tuple(bool(default if option is None else option) for option, default in zip(options, defaults))

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs) -> None:
        """Our transformer layers through transformers' checkpointing layer, timm trunks through their own
        `set_grad_checkpointing`."""
        if gradient_checkpointing_func is None:
            from torch.utils.checkpoint import checkpoint as gradient_checkpointing_func
        for module in self.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module._gradient_checkpointing_func = gradient_checkpointing_func
                module.gradient_checkpointing = enable
            elif getattr(module, "_skinlesion_trunk", False) and hasattr(module, "set_grad_checkpointing"):
                module.set_grad_checkpointing(enable)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # timm trunk modules get timm's own (EfficientNet "goog") initialisation: the transformers default would
        # re-draw every conv from N(0, 0.02) and collapse the trunk's activations, and skipping them would leave a
        # trunk that a checkpoint lacks as uninitialised memory. transformers only calls this for missing weights.
        if getattr(module, "_skinlesion_timm", False):
            if isinstance(module, nn.Conv2d):
                # Group-aware fan-out, so depthwise convolutions keep unit-scale activations.
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.weight.shape[0])
                nn.init.uniform_(module.weight, -bound, bound)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
                if module.running_mean is not None:
                    module.running_mean.zero_()
                    module.running_var.fill_(1.0)
                    module.num_batches_tracked.zero_()
            return
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.num_batches_tracked.zero_()
        elif isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=0.02)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Write the q/k/v/o layout, not the pre-SDPA `nn.MultiheadAttention` one that the load-time conversion reads.
        kwargs.setdefault("save_original_format", False)
        # `register_for_auto_class` records one auto class; add the other heads this model serves.
        if self._auto_class is not None:
            module = self.__class__.__module__.split(".")[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            for auto_class in self._extra_auto_classes:
                auto_map[auto_class] = f"{module}.{self.__class__.__name__}"
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


__all__ = ["SkinLesionPreTrainedModel"]
