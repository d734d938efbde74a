"""skin-dualnet models: the Deep-UNet lesion segmenter and the dual-encoder metadata classifier.

Atiq & Fattah, "Towards Explainable Skin Cancer Classification: A Dual-Network Attention Model with Lesion
Segmentation and Clinical Metadata Fusion" (arXiv 2510.17773).
"""

import math
from dataclasses import dataclass

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_skinlesion import SkinDualNetConfig, SkinLesionSegmenterConfig
from .image_processing_skinlesion import clean_mask

ENCODER_STRIDE = 32


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------
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


@dataclass
class SkinDualNetOutput(ModelOutput):
    r"""
    loss (`torch.Tensor` of shape `()`, *optional*, returned when `labels` is given):
        Class-weighted, label-smoothed cross-entropy.
    logits (`torch.Tensor` of shape `(batch_size, num_labels)`):
        Scores before softmax, plus `config.logit_bias` and divided by `config.temperature` (calibrated when those
        were fitted).
    lesion_mask (`torch.Tensor` of shape `(batch_size, 1, height, width)`, *optional*):
        Binary lesion mask used to build the lesion branch input (predicted by the segmenter unless given).
    lesion_pixel_values (`torch.Tensor` of shape `(batch_size, 3, height, width)`, *optional*):
        The lesion image the lesion branch saw.
    lesion_boxes (`torch.Tensor` of shape `(batch_size, 4)`, *optional*):
        Where the lesion image came from, `(x0, y0, x1, y1)` in input pixels.
    mask_empty (`torch.BoolTensor` of shape `(batch_size,)`, *optional*):
        `True` where the mask was empty or tiny and the lesion branch fell back to the full image.
    image_embeds, lesion_embeds, metadata_embeds (`torch.Tensor` of shape `(batch_size, fusion_dim)`):
        Pooled representations of each branch (`None` for a branch the config turns off).
    cross_attentions (`tuple[torch.Tensor]`, *optional*, returned when `output_attentions=True`):
        Per fusion layer, lesion-to-image then image-to-lesion attention weights, each
        `(batch_size, fusion_heads, query_tokens, key_tokens)`.
    attentions (`tuple[torch.Tensor]`, *optional*, returned when `output_attentions=True` and metadata is used):
        Self-attention weights of each metadata transformer layer, `(batch_size, metadata_heads, 4, 4)` over the
        [CLS], age, sex and site tokens.
    image_hidden_states, lesion_hidden_states (`tuple[torch.Tensor]`, *optional*, returned when
    `output_hidden_states=True`):
        Each branch's trunk stage outputs (timm `forward_intermediates`), shallowest first,
        `(batch_size, channels_i, h_i, w_i)`.
    fusion_hidden_states (`tuple[torch.Tensor]`, *optional*, returned when `output_hidden_states=True`):
        Per fusion layer, the lesion then the image tokens after it, each `(batch_size, tokens, fusion_dim)`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lesion_mask: torch.Tensor | None = None
    lesion_pixel_values: torch.Tensor | None = None
    lesion_boxes: torch.Tensor | None = None
    mask_empty: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    lesion_embeds: torch.Tensor | None = None
    metadata_embeds: torch.Tensor | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    image_hidden_states: tuple[torch.Tensor, ...] | None = None
    lesion_hidden_states: tuple[torch.Tensor, ...] | None = None
    fusion_hidden_states: tuple[torch.Tensor, ...] | None = None


# --------------------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------------------
def check_pixel_values(pixel_values: torch.Tensor | None, name: str = "pixel_values") -> None:
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
    if min(height, width) < ENCODER_STRIDE:
        raise ValueError(
            f"`{name}` is {height}x{width}, smaller than the encoder's total stride ({ENCODER_STRIDE}); "
            f"images must be at least {ENCODER_STRIDE}x{ENCODER_STRIDE}."
        )


def _check_mask(mask: torch.Tensor, name: str, pixel_values: torch.Tensor) -> torch.Tensor:
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


def _check_batch(tensor: torch.Tensor | None, name: str, batch_size: int) -> None:
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
# Segmenter blocks
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


# --------------------------------------------------------------------------------------------------------------------
# Classifier blocks
# --------------------------------------------------------------------------------------------------------------------
class SkinDualNetImageEncoder(nn.Module):
    """A timm trunk whose last feature map becomes tokens: 1x1 projection plus learned 2-D position embeddings."""

    def __init__(self, config: SkinDualNetConfig):
        super().__init__()
        self.trunk = create_timm_trunk(config.encoder_name)
        self.projection = nn.Conv2d(self.trunk.num_features, config.fusion_dim, 1)
        grid = math.ceil(config.image_size / ENCODER_STRIDE)
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.fusion_dim, grid, grid))

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Tokens `(batch_size, h * w, fusion_dim)` and, with `output_hidden_states`, the trunk's stage outputs."""
        if output_hidden_states:
            features, stages = self.trunk.forward_intermediates(pixel_values)
            return self.tokens(features), tuple(stages)
        return self.tokens(self.trunk.forward_features(pixel_values)), ()

    def tokens(self, trunk_features: torch.Tensor) -> torch.Tensor:
        """The trunk's last feature map `(batch_size, channels, h, w)` → tokens `(batch_size, h * w, fusion_dim)`."""
        features = self.projection(trunk_features)  # (batch, dim, h, w)
        position = self.position_embeddings
        if position.shape[-2:] != features.shape[-2:]:
            position = F.interpolate(position, size=features.shape[-2:], mode="bicubic", align_corners=False)
        return (features + position).flatten(2).transpose(1, 2)  # (batch, h * w, dim)


class SkinDualNetAttention(nn.Module):
    """Multi-head attention with explicit q/k/v/o projections. `attn_implementation="sdpa"` runs
    `torch.nn.functional.scaled_dot_product_attention`; `"eager"` computes the softmax itself and is used whenever the
    per-head weights are asked for."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.num_heads = heads
        self.head_dim = dim // heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(
        self,
        queries: torch.Tensor,
        context: torch.Tensor,
        attn_implementation: str = "sdpa",
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, dim = queries.shape

        def heads(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (batch, heads, n, d)

        query, key, value = heads(self.q_proj(queries)), heads(self.k_proj(context)), heads(self.v_proj(context))
        dropout = self.dropout if self.training else 0.0
        weights = None
        if attn_implementation == "eager" or output_attentions:
            weights = (query @ key.transpose(-2, -1) / math.sqrt(self.head_dim)).softmax(-1)  # (batch, heads, q, k)
            attended = F.dropout(weights, dropout, self.training) @ value
        else:
            attended = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
        attended = attended.transpose(1, 2).reshape(batch, length, dim)  # (batch, q, heads * head_dim)
        return self.o_proj(attended), weights if output_attentions else None


class SkinDualNetCrossAttentionLayer(GradientCheckpointingLayer):
    """Query tokens attend to context tokens: pre-norm multi-head attention and feed-forward, both residual."""

    def __init__(self, dim: int, heads: int, ffn_ratio: float, dropout: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim)
        self.attention = SkinDualNetAttention(dim, heads, dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        hidden = int(dim * ffn_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        queries: torch.Tensor,
        context: torch.Tensor,
        attn_implementation: str = "sdpa",
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attention(
            self.query_norm(queries), self.context_norm(context), attn_implementation, output_attentions
        )
        hidden_states = queries + self.dropout(attended)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states)), weights


class SkinDualNetFusion(nn.Module):
    """Bidirectional cross-attention between lesion and image tokens, then mean pooling of each side."""

    def __init__(self, config: SkinDualNetConfig):
        super().__init__()
        args = (config.fusion_dim, config.fusion_heads, config.fusion_ffn_ratio, config.fusion_dropout)
        self.lesion_to_image = nn.ModuleList(
            SkinDualNetCrossAttentionLayer(*args) for _ in range(config.fusion_layers)
        )
        self.image_to_lesion = nn.ModuleList(
            SkinDualNetCrossAttentionLayer(*args) for _ in range(config.fusion_layers)
        )
        self.image_norm = nn.LayerNorm(config.fusion_dim)
        self.lesion_norm = nn.LayerNorm(config.fusion_dim)

    def forward(
        self,
        image_tokens: torch.Tensor,
        lesion_tokens: torch.Tensor,
        attn_implementation: str = "sdpa",
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        attentions, hidden_states = [], []
        for lesion_layer, image_layer in zip(self.lesion_to_image, self.image_to_lesion):
            new_lesion, lesion_weights = lesion_layer(
                lesion_tokens, image_tokens, attn_implementation, output_attentions
            )
            new_image, image_weights = image_layer(image_tokens, lesion_tokens, attn_implementation, output_attentions)
            image_tokens, lesion_tokens = new_image, new_lesion
            if output_attentions:
                attentions.extend([lesion_weights, image_weights])
            if output_hidden_states:
                hidden_states.extend([lesion_tokens, image_tokens])
        image_embeds = self.image_norm(image_tokens).mean(1)
        return image_embeds, self.lesion_norm(lesion_tokens).mean(1), tuple(attentions), tuple(hidden_states)


class SkinDualNetMetadataLayer(GradientCheckpointingLayer):
    """Pre-norm transformer encoder layer (self-attention, GELU feed-forward), laid out like
    `nn.TransformerEncoderLayer(norm_first=True)` so older checkpoints map onto it."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = SkinDualNetAttention(dim, heads, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self, tokens: torch.Tensor, attn_implementation: str = "sdpa", output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed = self.norm1(tokens)
        attended, weights = self.self_attn(normed, normed, attn_implementation, output_attentions)
        tokens = tokens + self.dropout1(attended)
        tokens = tokens + self.dropout2(self.linear2(self.dropout(F.gelu(self.linear1(self.norm2(tokens))))))
        return tokens, weights


class SkinDualNetMetadataEncoder(nn.Module):
    """A small transformer over one token per metadata field plus [CLS]. Missing fields use learned tokens (the
    categorical vocabularies reserve index 0 for "unknown"), so the model runs with any subset of fields or none."""

    def __init__(self, config: SkinDualNetConfig):
        super().__init__()
        dim = config.fusion_dim
        self.age_mean, self.age_std = config.age_mean, config.age_std
        self.field_dropout = config.metadata_field_dropout
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.age_missing = nn.Parameter(torch.zeros(1, dim))
        self.age_projection = nn.Sequential(nn.Linear(1, dim), nn.GELU(), nn.Linear(dim, dim))
        self.sex_embeddings = nn.Embedding(len(config.sex_vocab), dim)
        self.site_embeddings = nn.Embedding(len(config.site_vocab), dim)
        self.field_embeddings = nn.Parameter(torch.zeros(1, 4, dim))
        self.layers = nn.ModuleList(
            SkinDualNetMetadataLayer(
                dim, config.metadata_heads, int(dim * config.fusion_ffn_ratio), config.fusion_dropout
            )
            for _ in range(config.metadata_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        age: torch.Tensor,
        sex_ids: torch.Tensor,
        site_ids: torch.Tensor,
        attn_implementation: str = "sdpa",
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        age_missing = torch.isnan(age)
        if self.training and self.field_dropout > 0:
            # Randomly hide fields so the model learns to predict with any subset of them.
            drop = torch.rand(3, *age.shape, device=age.device) < self.field_dropout
            age_missing = age_missing | drop[0]
            sex_ids = sex_ids.masked_fill(drop[1], 0)
            site_ids = site_ids.masked_fill(drop[2], 0)
        scaled = ((torch.nan_to_num(age) - self.age_mean) / self.age_std).unsqueeze(-1)  # (batch, 1)
        age_token = torch.where(age_missing.unsqueeze(-1), self.age_missing, self.age_projection(scaled))
        tokens = torch.stack(
            [
                self.cls_token[:, 0].expand(age.shape[0], -1),
                age_token,
                self.sex_embeddings(sex_ids),
                self.site_embeddings(site_ids),
            ],
            dim=1,
        )  # (batch, 4, dim)
        tokens = tokens + self.field_embeddings
        attentions = []
        for layer in self.layers:
            tokens, weights = layer(tokens, attn_implementation, output_attentions)
            if output_attentions:
                attentions.append(weights)
        return self.norm(tokens[:, 0]), tuple(attentions)


def _register_legacy_attention_layout() -> None:
    """Checkpoints saved before the attention layers had explicit q/k/v/o projections hold `nn.MultiheadAttention`'s
    fused `in_proj_weight`/`in_proj_bias` and `out_proj`: split and rename them on load (same outputs)."""
    try:
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping
        from transformers.core_model_loading import Chunk, WeightConverter, WeightRenaming
    except ImportError:  # an older transformers without conversion mappings: old checkpoints need converting by hand
        return
    mapping = [
        WeightConverter(
            source_patterns="in_proj_weight",
            target_patterns=["q_proj.weight", "k_proj.weight", "v_proj.weight"],
            operations=[Chunk(dim=0)],
        ),
        WeightConverter(
            source_patterns="in_proj_bias",
            target_patterns=["q_proj.bias", "k_proj.bias", "v_proj.bias"],
            operations=[Chunk(dim=0)],
        ),
        WeightRenaming(source_patterns=r"\.out_proj\.", target_patterns=".o_proj."),
    ]
    register_checkpoint_conversion_mapping("SkinDualNet", mapping, overwrite=True)


_register_legacy_attention_layout()


def create_timm_trunk(name: str, pretrained: bool = False, features_only: bool = False) -> nn.Module:
    """A timm trunk without classifier head. Its modules are flagged so `_init_weights` keeps timm's initialisation."""
    kwargs = {"features_only": True} if features_only else {"num_classes": 0, "global_pool": ""}
    trunk = timm.create_model(name, pretrained=pretrained, **kwargs)
    for module in trunk.modules():
        module._skinlesion_timm = True
    trunk._skinlesion_trunk = True
    return trunk


def build_lesion_image(
    pixel_values: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "mask_crop",
    margin: float = 0.1,
    min_fraction: float = 0.005,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build the lesion branch input from normalised images and binary masks.

    Args:
        pixel_values: `(batch_size, 3, height, width)`, normalised.
        mask: `(batch_size, 1, height, width)`, 1 on the lesion.
        mode: `"mask"` blanks the background to 0 (the normalisation mean colour), `"crop"` crops a square around
            the mask's bounding box (plus `margin` of its size on each side) and resizes it back, `"mask_crop"`
            does both.
        min_fraction: masks covering less than this share of the image count as empty.

    Returns:
        The lesion images `(batch_size, 3, height, width)`, the boxes they were cropped from `(batch_size, 4)` as
        `(x0, y0, x1, y1)` in pixels, and `mask_empty` `(batch_size,)`: for those the full image is used.
    """
    if mode not in ("mask", "crop", "mask_crop"):
        raise ValueError(f"`lesion_mode` must be one of 'mask', 'crop', 'mask_crop', got {mode!r}.")
    batch, _, height, width = pixel_values.shape
    binary = (mask > 0.5).to(pixel_values.dtype)
    empty = binary.flatten(1).mean(1) < min_fraction
    full = pixel_values.new_tensor([0.0, 0.0, width, height]).expand(batch, 4)
    lesion = pixel_values * binary if "mask" in mode else pixel_values
    boxes = full.clone()
    if "crop" in mode:
        rows, cols = binary.amax(dim=3)[:, 0] > 0, binary.amax(dim=2)[:, 0] > 0  # (batch, h), (batch, w)
        y0 = rows.float().argmax(1)
        y1 = height - rows.flip(1).float().argmax(1)
        x0 = cols.float().argmax(1)
        x1 = width - cols.flip(1).float().argmax(1)
        # A square box around the lesion, grown by the margin and shifted (not cut) to stay inside the image.
        side = (torch.maximum(x1 - x0, y1 - y0).to(pixel_values.dtype) * (1 + 2 * margin)).clamp(
            min=ENCODER_STRIDE, max=min(height, width)
        )
        cx, cy = (x0 + x1).to(pixel_values.dtype) / 2, (y0 + y1).to(pixel_values.dtype) / 2
        bx0 = (cx - side / 2).clamp(min=0).minimum(width - side)
        by0 = (cy - side / 2).clamp(min=0).minimum(height - side)
        boxes = torch.stack([bx0, by0, bx0 + side, by0 + side], dim=1)
        boxes = torch.where(empty.unsqueeze(1), full, boxes)
        theta = torch.zeros(batch, 2, 3, dtype=pixel_values.dtype, device=pixel_values.device)
        theta[:, 0, 0] = (boxes[:, 2] - boxes[:, 0]) / width
        theta[:, 0, 2] = (boxes[:, 0] + boxes[:, 2]) / width - 1
        theta[:, 1, 1] = (boxes[:, 3] - boxes[:, 1]) / height
        theta[:, 1, 2] = (boxes[:, 1] + boxes[:, 3]) / height - 1
        grid = F.affine_grid(theta, [batch, 3, height, width], align_corners=False)
        lesion = F.grid_sample(lesion, grid, mode="bilinear", padding_mode="border", align_corners=False)
    lesion = torch.where(empty.view(batch, 1, 1, 1), pixel_values, lesion)
    return lesion, boxes, empty


# --------------------------------------------------------------------------------------------------------------------
# Pre-trained models
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

    def _output_options(
        self, output_attentions: bool | None, output_hidden_states: bool | None, return_dict: bool | None
    ) -> tuple[bool, bool, bool]:
        """The forward's `output_attentions` / `output_hidden_states` / `return_dict`, defaulting to the config's."""
        config = self.config
        return (
            bool(output_attentions if output_attentions is not None else config.output_attentions),
            bool(output_hidden_states if output_hidden_states is not None else config.output_hidden_states),
            bool(return_dict if return_dict is not None else config.return_dict),
        )

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
        elif isinstance(module, SkinDualNetImageEncoder):
            nn.init.trunc_normal_(module.position_embeddings, std=0.02)
        elif isinstance(module, SkinDualNetMetadataEncoder):
            for parameter in (module.cls_token, module.age_missing, module.field_embeddings):
                nn.init.trunc_normal_(parameter, std=0.02)

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


class SkinLesionSegmenter(SkinLesionPreTrainedModel):
    """Deep-UNet: timm encoder (all five stages) → ASPP → decoder with Dual Attention Gates → 1-channel head."""

    config_class = SkinLesionSegmenterConfig
    _extra_auto_classes = ("AutoModelForSemanticSegmentation",)

    def __init__(self, config: SkinLesionSegmenterConfig):
        super().__init__(config)
        config.check()
        self.encoder = create_timm_trunk(config.encoder_name, features_only=True)
        channels = self.encoder.feature_info.channels()
        if len(channels) != 5:
            raise ValueError(
                f"`encoder_name`={config.encoder_name!r} gives {len(channels)} feature stages; the Deep-UNet needs 5."
            )
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

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SkinLesionSegmenterOutput | tuple:
        r"""
        pixel_values (`torch.Tensor` of shape `(batch_size, 3, height, width)`):
            Normalised images.
        labels (`torch.Tensor` of shape `(batch_size, 1, height, width)` or `(batch_size, height, width)`, *optional*):
            Ground-truth lesion masks with values in [0, 1].
        """
        check_pixel_values(pixel_values)
        output_attentions, output_hidden_states, return_dict = self._output_options(
            output_attentions, output_hidden_states, return_dict
        )
        if labels is not None:
            labels = _check_mask(labels, "labels", pixel_values)
        features = self.encoder(pixel_values)
        hidden_states = self.aspp(features[-1])
        hidden_states, attentions = self.decoder(hidden_states, features[:-1], pixel_values.shape[-2:])
        logits = self.segmentation_head(hidden_states)  # (batch, 1, height, width)
        loss = None
        if labels is not None:
            loss = segmentation_loss(logits, labels, self.config.bce_weight, self.config.dice_weight)
        outputs = SkinLesionSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=tuple(features) if output_hidden_states else None,
            attentions=attentions if output_attentions else None,
        )
        return outputs if return_dict else outputs.to_tuple()


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


class SkinDualNet(SkinLesionPreTrainedModel):
    """Dual-encoder classifier: image and lesion-image encoders fused by cross-attention, a metadata transformer,
    and a head. It owns a segmenter, so one checkpoint segments, builds the lesion image and classifies."""

    config_class = SkinDualNetConfig
    _extra_auto_classes = ("AutoModelForImageClassification",)

    def __init__(self, config: SkinDualNetConfig):
        super().__init__(config)
        config.check()
        self.segmenter = SkinLesionSegmenter(config.segmenter_config)
        # The segmenter is trained on its own (scripts/train_segmenter.py) and frozen here; the classifier only
        # uses its masks, computed under `no_grad`.
        self.segmenter.requires_grad_(False)
        self.image_encoder = SkinDualNetImageEncoder(config)
        self.lesion_encoder = None
        self.fusion = None
        if config.use_lesion_branch:
            if not config.share_encoders:
                self.lesion_encoder = SkinDualNetImageEncoder(config)
            self.fusion = SkinDualNetFusion(config)
        else:
            self.image_norm = nn.LayerNorm(config.fusion_dim)
        self.metadata_encoder = SkinDualNetMetadataEncoder(config) if config.use_metadata else None
        parts = 1 + int(config.use_lesion_branch) + int(config.use_metadata)
        self.classifier = nn.Sequential(
            nn.LayerNorm(parts * config.fusion_dim),
            nn.Linear(parts * config.fusion_dim, config.classifier_hidden_size),
            nn.GELU(),
            nn.Dropout(config.classifier_dropout),
            nn.Linear(config.classifier_hidden_size, config.num_labels),
        )
        self.post_init()

    @property
    def lesion_branch(self) -> SkinDualNetImageEncoder | None:
        """The encoder that sees the lesion image (the image encoder itself when `share_encoders`)."""
        if not self.config.use_lesion_branch:
            return None
        return self.lesion_encoder if self.lesion_encoder is not None else self.image_encoder

    def load_pretrained_backbones(self) -> None:
        """Load ImageNet weights into every timm trunk, the segmenter's included (needs the Hub)."""
        weights = create_timm_trunk(self.config.encoder_name, pretrained=True).state_dict()
        for encoder in (self.image_encoder, self.lesion_encoder):
            if encoder is not None:
                encoder.trunk.load_state_dict(weights)
        self.segmenter.load_pretrained_backbones()

    @torch.no_grad()
    def predict_lesion_mask(self, pixel_values: torch.Tensor, clean: bool = True) -> torch.Tensor:
        """Binary lesion masks `(batch_size, 1, height, width)` from the nested segmenter, run in eval mode at its own
        input size (the caller's train/eval mode is restored), cleaned (largest component, holes filled) unless
        `clean=False`. This is the one image → mask path: the forward, the pipelines, evaluation and the Space all
        use it."""
        check_pixel_values(pixel_values)
        size = self.config.segmenter_config.image_size
        inputs = pixel_values
        if tuple(inputs.shape[-2:]) != (size, size):
            inputs = F.interpolate(inputs, size=(size, size), mode="bilinear", align_corners=False)
        was_training = self.segmenter.training
        self.segmenter.eval()
        try:
            logits = self.segmenter(pixel_values=inputs).logits
        finally:
            self.segmenter.train(was_training)
        if logits.shape[-2:] != pixel_values.shape[-2:]:
            logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        masks = logits.sigmoid() > self.config.segmenter_config.mask_threshold  # (batch, 1, height, width)
        if clean:
            cleaned = [clean_mask(mask[0].cpu().numpy()) for mask in masks]
            masks = torch.from_numpy(np.stack(cleaned))[:, None].to(pixel_values.device)
        return masks.to(pixel_values.dtype)

    def lesion_inputs(
        self, pixel_values: torch.Tensor, lesion_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The lesion branch's input: `(lesion_mask, lesion_pixel_values, lesion_boxes, mask_empty)` from a given
        mask, or from the segmenter's (cleaned) mask when `lesion_mask` is None."""
        if lesion_mask is None:
            lesion_mask = self.predict_lesion_mask(pixel_values)
        else:
            lesion_mask = _check_mask(lesion_mask, "lesion_mask", pixel_values)
        lesion_pixel_values, lesion_boxes, mask_empty = build_lesion_image(
            pixel_values,
            lesion_mask,
            self.config.lesion_mode,
            self.config.lesion_margin,
            self.config.min_lesion_fraction,
        )
        return lesion_mask, lesion_pixel_values, lesion_boxes, mask_empty

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        age: torch.Tensor | None = None,
        sex_ids: torch.Tensor | None = None,
        site_ids: torch.Tensor | None = None,
        lesion_mask: torch.Tensor | None = None,
        lesion_pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SkinDualNetOutput | tuple:
        r"""
        pixel_values (`torch.Tensor` of shape `(batch_size, 3, height, width)`):
            Normalised images.
        age (`torch.Tensor` of shape `(batch_size,)`, *optional*):
            Age in years, NaN where unknown.
        sex_ids, site_ids (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Indices into the config's `sex_vocab` / `site_vocab`; 0 is unknown. Build all three with
            `SkinLesionMetadataProcessor`. Any may be omitted (treated as unknown).
        lesion_mask (`torch.Tensor` of shape `(batch_size, 1, height, width)`, *optional*):
            Binary lesion mask (e.g. ground truth while training). Predicted by the segmenter when omitted.
        lesion_pixel_values (`torch.Tensor` of shape `(batch_size, 3, height, width)`, *optional*):
            A ready lesion image; skips the mask entirely.
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices.
        """
        check_pixel_values(pixel_values)
        batch = pixel_values.shape[0]
        for name, tensor in (("age", age), ("sex_ids", sex_ids), ("site_ids", site_ids), ("labels", labels)):
            _check_batch(tensor, name, batch)
        if labels is not None and (
            labels.is_floating_point() or labels.min() < 0 or labels.max() >= self.config.num_labels
        ):
            raise ValueError(
                f"`labels` must be integer class indices in [0, {self.config.num_labels}), got {labels.tolist()}; "
                f"the labels are {self.config.id2label}."
            )

        output_attentions, output_hidden_states, return_dict = self._output_options(
            output_attentions, output_hidden_states, return_dict
        )
        image_tokens, image_stages = self.image_encoder(pixel_values, output_hidden_states)
        lesion_boxes = mask_empty = lesion_tokens = None
        lesion_stages = ()
        if self.config.use_lesion_branch:
            if lesion_pixel_values is not None:
                check_pixel_values(lesion_pixel_values, "lesion_pixel_values")
                if lesion_pixel_values.shape[0] != batch:
                    raise ValueError(
                        f"`lesion_pixel_values` has batch size {lesion_pixel_values.shape[0]} but `pixel_values` "
                        f"has {batch}."
                    )
            else:
                lesion_mask, lesion_pixel_values, lesion_boxes, mask_empty = self.lesion_inputs(
                    pixel_values, lesion_mask
                )
            lesion_tokens, lesion_stages = self.lesion_branch(lesion_pixel_values, output_hidden_states)
        outputs = self.classify_tokens(
            image_tokens, lesion_tokens, age, sex_ids, site_ids, labels, output_attentions, output_hidden_states
        )
        outputs.lesion_mask = lesion_mask
        outputs.lesion_pixel_values = lesion_pixel_values
        outputs.lesion_boxes = lesion_boxes
        outputs.mask_empty = mask_empty
        if output_hidden_states:
            outputs.image_hidden_states = image_stages
            outputs.lesion_hidden_states = lesion_stages if self.config.use_lesion_branch else None
        return outputs if return_dict else outputs.to_tuple()

    def classify_tokens(
        self,
        image_tokens: torch.Tensor,
        lesion_tokens: torch.Tensor | None = None,
        age: torch.Tensor | None = None,
        sex_ids: torch.Tensor | None = None,
        site_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> SkinDualNetOutput:
        """Fusion, metadata and head on the branch tokens `(batch_size, tokens, fusion_dim)`: the part of `forward`
        after the encoders (training on cached trunk features enters here)."""
        batch = image_tokens.shape[0]
        attn_implementation = self.config._attn_implementation or "sdpa"
        lesion_embeds = None
        cross_attentions = fusion_states = metadata_attentions = ()
        if self.config.use_lesion_branch:
            image_embeds, lesion_embeds, cross_attentions, fusion_states = self.fusion(
                image_tokens, lesion_tokens, attn_implementation, output_attentions, output_hidden_states
            )
            parts = [image_embeds, lesion_embeds]
        else:
            image_embeds = self.image_norm(image_tokens).mean(1)
            parts = [image_embeds]

        metadata_embeds = None
        if self.metadata_encoder is not None:
            if age is None:
                age = image_tokens.new_full((batch,), float("nan"))
            zeros = torch.zeros(batch, dtype=torch.long, device=image_tokens.device)
            metadata_embeds, metadata_attentions = self.metadata_encoder(
                age.to(image_tokens.dtype),
                sex_ids.long() if sex_ids is not None else zeros,
                site_ids.long() if site_ids is not None else zeros,
                attn_implementation,
                output_attentions,
            )
            parts.append(metadata_embeds)

        raw_logits = self.classifier(torch.cat(parts, dim=-1))
        loss = None
        if labels is not None:
            weight = adjusted = None
            if self.config.class_weights is not None:
                weight = raw_logits.new_tensor(self.config.class_weights, dtype=torch.float32)
            adjusted = raw_logits.float()
            if self.config.logit_adjustment is not None:
                adjusted = adjusted + adjusted.new_tensor(self.config.logit_adjustment)
            loss = F.cross_entropy(
                adjusted, labels.long(), weight=weight, label_smoothing=float(self.config.label_smoothing)
            )
        # The post-hoc bias and the temperature (fitted after training, in the config) apply at every entry point.
        logits = raw_logits
        if self.config.logit_bias is not None:
            logits = logits + logits.new_tensor(self.config.logit_bias)
        if self.config.temperature != 1.0:
            logits = logits / self.config.temperature
        return SkinDualNetOutput(
            loss=loss,
            logits=logits,
            image_embeds=image_embeds,
            lesion_embeds=lesion_embeds,
            metadata_embeds=metadata_embeds,
            cross_attentions=cross_attentions if output_attentions else None,
            attentions=metadata_attentions if output_attentions and self.metadata_encoder is not None else None,
            fusion_hidden_states=fusion_states if output_hidden_states else None,
        )


__all__ = [
    "SkinLesionSegmenterOutput",
    "SkinDualNetOutput",
    "SkinLesionPreTrainedModel",
    "SkinLesionSegmenter",
    "SkinDualNet",
    "build_lesion_image",
]
