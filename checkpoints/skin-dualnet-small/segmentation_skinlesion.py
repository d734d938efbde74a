"""The Deep-UNet lesion segmenter (the paper's segmentation network; `SkinDualNet` nests one): a timm encoder tapped
at its five feature stages, an ASPP bottleneck on the deepest map, and a decoder whose skip connections pass through
Dual Attention Gates."""

from dataclasses import dataclass
from typing import Unpack

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple

from .configuration_skinlesion import SkinLesionSegmenterConfig
from .pretrained_skinlesion import (
    SkinLesionPreTrainedModel,
    check_image_size,
    check_mask,
    check_pixel_values,
    create_timm_trunk,
)


@dataclass
class SkinLesionSegmenterOutput(ModelOutput):
    r"""
    loss (`torch.Tensor` of shape `()`, *optional*, returned when `labels` is given):
        Binary cross-entropy plus soft Dice, weighted by the config.
    logits (`torch.Tensor` of shape `(batch_size, 1, height, width)`):
        Lesion logits at input resolution.
    hidden_states (`tuple[torch.Tensor]`, *optional*, returned when `output_hidden_states=True`):
        The encoder's five feature stages, shallowest first, each `(batch_size, channels_i, height / 2**i, width /
        2**i)` for i = 1..5.
    attentions (`tuple[torch.Tensor]`, *optional*, returned when `output_attentions=True`):
        Spatial attention map of each Dual Attention Gate, deepest first, each `(batch_size, 1, h, w)`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# --------------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------------
class SkinLesionConvBnAct(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1):
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SkinLesionASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three atrous 3x3 and an image-pooling branch, projected and dropped."""

    def __init__(self, in_channels: int, out_channels: int, rates: list[int], dropout: float):
        super().__init__()
        self.branches = nn.ModuleList(
            [SkinLesionConvBnAct(in_channels, out_channels, 1)]
            + [SkinLesionConvBnAct(in_channels, out_channels, 3, dilation=rate) for rate in rates]
        )
        # No BatchNorm on the pooled branch: a 1x1 map with batch size 1 has no batch statistics to train on.
        self.pooling = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(inplace=True)
        )
        self.project = nn.Sequential(
            SkinLesionConvBnAct(out_channels * (len(rates) + 2), out_channels, 1), nn.Dropout(dropout)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        outputs = [branch(features) for branch in self.branches]
        outputs.append(self.pooling(features).expand(-1, -1, *features.shape[-2:]))
        return self.project(torch.cat(outputs, dim=1))


class SkinLesionDualAttentionGate(nn.Module):
    """Gates a skip connection with spatial additive attention (Attention U-Net) times channel attention
    (squeeze-excitation driven by both the skip and the decoder feature)."""

    def __init__(self, skip_channels: int, gate_channels: int, reduction: int):
        super().__init__()
        inter = max(skip_channels // 2, 8)
        self.skip_projection = nn.Sequential(nn.Conv2d(skip_channels, inter, 1, bias=False), nn.BatchNorm2d(inter))
        self.gate_projection = nn.Sequential(nn.Conv2d(gate_channels, inter, 1, bias=False), nn.BatchNorm2d(inter))
        self.spatial = nn.Sequential(nn.ReLU(), nn.Conv2d(inter, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())
        hidden = max((skip_channels + gate_channels) // reduction, 8)
        self.channel = nn.Sequential(
            nn.Conv2d(skip_channels + gate_channels, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, skip_channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spatial = self.spatial(self.skip_projection(skip) + self.gate_projection(gate))  # (batch, 1, h, w)
        pooled = torch.cat([skip.mean(dim=(2, 3), keepdim=True), gate.mean(dim=(2, 3), keepdim=True)], dim=1)
        channel = self.channel(pooled)  # (batch, skip_channels, 1, 1)
        return skip * spatial * channel, spatial


class SkinLesionDecoderBlock(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, reduction: int):
        super().__init__()
        self.attention_gate = (
            SkinLesionDualAttentionGate(skip_channels, in_channels, reduction) if skip_channels > 0 else None
        )
        self.conv1 = SkinLesionConvBnAct(in_channels + skip_channels, out_channels)
        self.conv2 = SkinLesionConvBnAct(out_channels, out_channels)

    def forward(
        self, hidden_states: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden_states = F.interpolate(hidden_states, size=size, mode="bilinear", align_corners=False)
        attention = None
        if self.attention_gate is not None:
            skip, attention = self.attention_gate(skip, hidden_states)
            hidden_states = torch.cat([hidden_states, skip], dim=1)
        return self.conv2(self.conv1(hidden_states)), attention


class SkinLesionDecoder(nn.Module):
    """Four gated blocks up the skip connections (strides 16, 8, 4, 2), then one block to full resolution."""

    def __init__(self, in_channels: int, skip_channels: list[int], decoder_channels: list[int], reduction: int):
        super().__init__()
        skips = list(reversed(skip_channels)) + [0]
        inputs = [in_channels] + list(decoder_channels[:-1])
        self.blocks = nn.ModuleList(
            SkinLesionDecoderBlock(i, s, o, reduction) for i, s, o in zip(inputs, skips, decoder_channels)
        )

    def forward(
        self, hidden_states: torch.Tensor, skips: list[torch.Tensor], output_size: tuple[int, int]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        attentions = []
        skips = list(reversed(skips)) + [None]
        for block, skip in zip(self.blocks, skips):
            size = skip.shape[-2:] if skip is not None else output_size
            hidden_states, attention = block(hidden_states, skip, size)
            if attention is not None:
                attentions.append(attention)
        return hidden_states, tuple(attentions)


class SkinLesionSegmenter(SkinLesionPreTrainedModel):
    """Deep-UNet: timm encoder (all five stages) → ASPP → decoder with Dual Attention Gates → 1-channel head."""

    config_class = SkinLesionSegmenterConfig
    _extra_auto_classes = ("AutoModelForSemanticSegmentation",)

    def __init__(self, config: SkinLesionSegmenterConfig):
        super().__init__(config)
        self.encoder = create_timm_trunk(config.encoder_name, features_only=True)
        channels = self.encoder.feature_info.channels()
        if len(channels) != 5:
            raise ValueError(
                f"`encoder_name`={config.encoder_name!r} gives {len(channels)} feature stages; the Deep-UNet needs 5."
            )
        self.stride = self.encoder.feature_info.reduction()[-1]
        check_image_size(config.image_size, self.stride)
        self.aspp = SkinLesionASPP(channels[-1], config.aspp_channels, config.aspp_rates, config.aspp_dropout)
        self.decoder = SkinLesionDecoder(
            config.aspp_channels, channels[:-1], config.decoder_channels, config.attention_reduction
        )
        self.segmentation_head = nn.Conv2d(config.decoder_channels[-1], 1, 3, padding=1)
        self.post_init()

    def load_pretrained_backbones(self) -> None:
        """Load ImageNet weights into the timm encoder (needs the Hub; training scripts call it on request)."""
        weights = create_timm_trunk(self.config.encoder_name, pretrained=True, features_only=True).state_dict()
        self.encoder.load_state_dict(weights)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SkinLesionSegmenterOutput:
        r"""
        pixel_values (`torch.Tensor` of shape `(batch_size, 3, height, width)`):
            Normalised images, at least `self.stride` (the encoder's total stride) on each side.
        labels (`torch.Tensor` of shape `(batch_size, 1, height, width)` or `(batch_size, height, width)`, *optional*):
            Ground-truth lesion masks with values in [0, 1].
        output_attentions, output_hidden_states, return_dict (`bool`, *optional*):
            Return the attention gates' maps / the encoder's stages; `return_dict=False` gives a tuple of the
            non-`None` fields. Each defaults to the config's.
        """
        check_pixel_values(pixel_values, self.stride)
        output_attentions, output_hidden_states = self._output_options(kwargs)
        if labels is not None:
            labels = check_mask(labels, "labels", pixel_values)
        features = self.encoder(pixel_values)
        hidden_states = self.aspp(features[-1])
        hidden_states, attentions = self.decoder(hidden_states, features[:-1], pixel_values.shape[-2:])
        logits = self.segmentation_head(hidden_states)  # (batch, 1, height, width)
        loss = None
        if labels is not None:
            loss = segmentation_loss(logits, labels, self.config.bce_weight, self.config.dice_weight)
        return SkinLesionSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=tuple(features) if output_hidden_states else None,
            attentions=attentions if output_attentions else None,
        )


def segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, bce_weight: float, dice_weight: float
) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice (per image, averaged over the batch)."""
    logits = logits.float()
    labels = labels.float()
    bce = F.binary_cross_entropy_with_logits(logits, labels)
    probabilities = logits.sigmoid().flatten(1)
    targets = labels.flatten(1)
    dice = (2 * (probabilities * targets).sum(1) + 1.0) / (probabilities.sum(1) + targets.sum(1) + 1.0)
    return bce_weight * bce + dice_weight * (1 - dice.mean())


__all__ = ["SkinLesionSegmenterOutput", "SkinLesionSegmenter", "segmentation_loss"]
