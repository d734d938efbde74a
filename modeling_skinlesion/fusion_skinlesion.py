"""The classifier's token blocks: multi-head attention, the bidirectional cross-attention fusion of the image and
lesion tokens, and the metadata transformer whose [CLS] token joins them. Checkpoints saved with
`nn.MultiheadAttention`'s fused projections load through a conversion mapping registered here."""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_skinlesion import SkinDualNetConfig


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
        self, queries: torch.Tensor, context: torch.Tensor, **attention_kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attention_kwargs` (`attn_implementation`, `output_attentions`) go to `SkinDualNetAttention`."""
        attended, weights = self.attention(self.query_norm(queries), self.context_norm(context), **attention_kwargs)
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
        self, image_tokens: torch.Tensor, lesion_tokens: torch.Tensor, output_hidden_states: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Pooled image and lesion embeddings, then per layer the attention weights (when `output_attentions`) and
        the tokens (when `output_hidden_states`). `kwargs` (`attn_implementation`, `output_attentions`) go to each
        layer's attention."""
        attentions, hidden_states = [], []
        for lesion_layer, image_layer in zip(self.lesion_to_image, self.image_to_lesion):
            new_lesion, lesion_weights = lesion_layer(lesion_tokens, image_tokens, **kwargs)
            new_image, image_weights = image_layer(image_tokens, lesion_tokens, **kwargs)
            image_tokens, lesion_tokens = new_image, new_lesion
            if kwargs.get("output_attentions"):
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
        # `None` in the config means "as the fusion" (what checkpoints saved before these fields were added used).
        ffn_ratio = config.fusion_ffn_ratio if config.metadata_ffn_ratio is None else config.metadata_ffn_ratio
        dropout = config.fusion_dropout if config.metadata_dropout is None else config.metadata_dropout
        self.layers = nn.ModuleList(
            SkinDualNetMetadataLayer(dim, config.metadata_heads, int(dim * ffn_ratio), dropout)
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


__all__ = ["SkinDualNetFusion", "SkinDualNetMetadataEncoder"]
