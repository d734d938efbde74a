"""The dual-encoder metadata classifier `SkinDualNet`: image and lesion-image encoders fused by cross-attention, a
metadata transformer and a head; it owns the lesion segmenter, so one checkpoint segments, builds the lesion image
and classifies. The segmenter lives in `segmentation_skinlesion.py` and is re-exported here.

Atiq & Fattah, "Towards Explainable Skin Cancer Classification: A Dual-Network Attention Model with Lesion
Segmentation and Clinical Metadata Fusion" (arXiv 2510.17773).
"""

import math
from dataclasses import dataclass
from typing import Unpack

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple

from .configuration_skinlesion import LESION_MODES, SkinDualNetConfig
from .fusion_skinlesion import SkinDualNetFusion, SkinDualNetMetadataEncoder
from .image_processing_skinlesion import clean_mask
from .pretrained_skinlesion import (
    SkinLesionPreTrainedModel,
    check_batch,
    check_image_size,
    check_mask,
    check_pixel_values,
    create_timm_trunk,
    trunk_stride,
)
from .segmentation_skinlesion import SkinLesionSegmenter, SkinLesionSegmenterOutput


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
    ood_score (`torch.Tensor` of shape `(batch_size,)`, *optional*, returned when the config has a fitted gate):
        Out-of-distribution score: the smallest squared Mahalanobis distance of the image's features to a class mean
        of the training split (higher = less like the training images).
    in_distribution (`torch.BoolTensor` of shape `(batch_size,)`, *optional*, returned with `ood_score`):
        `ood_score <= config.ood_threshold`; `False` means the answer should not be trusted (not a dermoscopic image
        like those the model was trained on).
    malignancy_score (`torch.Tensor` of shape `(batch_size,)`, *optional*, returned when the config names malignant
        classes):
        Sum of the calibrated probabilities of `config.malignant_labels`.
    refer (`torch.BoolTensor` of shape `(batch_size,)`, *optional*, returned when the config has a referral point):
        `malignancy_score >= config.referral_threshold` (the operating point of `config.referral_sensitivity`).
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
    ood_score: torch.Tensor | None = None
    in_distribution: torch.Tensor | None = None
    malignancy_score: torch.Tensor | None = None
    refer: torch.Tensor | None = None


def energy_score(logits: torch.Tensor) -> torch.Tensor:
    """Negative free energy, `-logsumexp(logits)` `(batch_size,)` (Liu et al., 2020): higher = more out of
    distribution."""
    return -torch.logsumexp(logits.float(), dim=-1)


def mahalanobis_score(features: torch.Tensor, means: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    """Smallest squared Mahalanobis distance of `features` `(batch_size, dim)` to the class means `(num_classes, dim)`
    under a tied covariance given by its `whitening` `(dim, dim)` (`whitening @ whitening.T` = inverse covariance):
    `(batch_size,)`, higher = more out of distribution (Lee et al., 2018)."""
    projected = features.float() @ whitening.float()  # (batch, dim)
    centres = means.float() @ whitening.float()  # (classes, dim)
    return torch.cdist(projected, centres).square().amin(dim=1)


class SkinDualNetOODGate(nn.Module):
    """Class-conditional Gaussians with a tied covariance on the classifier's features (Lee et al., 2018): the class
    means `(num_labels, dim)` and the covariance's whitening matrix `(dim, dim)` are buffers saved with the weights,
    fitted on the training split by `modeling_skinlesion.trust.fit_ood_gate`. Before fitting (or when a checkpoint
    lacks them) they are NaN, so every score is NaN and no image counts as in distribution."""

    def __init__(self, num_labels: int, dim: int):
        super().__init__()
        self.register_buffer("means", torch.full((num_labels, dim), float("nan")))
        self.register_buffer("whitening", torch.full((dim, dim), float("nan")))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`ood_score` `(batch_size,)` of features `(batch_size, dim)`."""
        if features.shape[-1] != self.means.shape[-1]:
            raise ValueError(
                f"The OOD gate was fitted on {self.means.shape[-1]}-dimensional features, got {features.shape[-1]}."
            )
        return mahalanobis_score(features.detach(), self.means, self.whitening)


class SkinDualNetImageEncoder(nn.Module):
    """A timm trunk whose last feature map becomes tokens: 1x1 projection plus learned 2-D position embeddings (one
    per cell of the `image_size` input's map; other sizes interpolate them). `stride` is the trunk's total stride,
    read from timm's `feature_info`."""

    def __init__(self, config: SkinDualNetConfig):
        super().__init__()
        self.trunk = create_timm_trunk(config.encoder_name)
        self.stride = trunk_stride(self.trunk)
        check_image_size(config.image_size, self.stride)
        self.projection = nn.Conv2d(self.trunk.num_features, config.fusion_dim, 1)
        grid = math.ceil(config.image_size / self.stride)
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


def build_lesion_image(
    pixel_values: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "mask_crop",
    margin: float = 0.1,
    min_fraction: float = 0.005,
    min_side: int = 32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build the lesion branch input from normalised images and binary masks.

    Args:
        pixel_values: `(batch_size, 3, height, width)`, normalised.
        mask: `(batch_size, 1, height, width)`, 1 on the lesion.
        mode: `"mask"` blanks the background to 0 (the normalisation mean colour), `"crop"` crops a square around
            the mask's bounding box (plus `margin` of its size on each side) and resizes it back, `"mask_crop"`
            does both.
        min_fraction: masks covering less than this share of the image count as empty.
        min_side: the smallest crop side in pixels; `SkinDualNet` passes its encoder's total stride, so the crop
            spans at least one token.

    Returns:
        The lesion images `(batch_size, 3, height, width)`, the boxes they were cropped from `(batch_size, 4)` as
        `(x0, y0, x1, y1)` in pixels, and `mask_empty` `(batch_size,)`: for those the full image is used.
    """
    if mode not in LESION_MODES:
        raise ValueError(f"`lesion_mode` must be one of {LESION_MODES}, got {mode!r}.")
    batch, _, height, width = pixel_values.shape
    binary = (mask > 0.5).to(pixel_values.dtype)
    empty = binary.flatten(1).mean(1) < min_fraction
    full = pixel_values.new_tensor([0.0, 0.0, width, height]).expand(batch, 4)
    lesion = pixel_values * binary if "mask" in mode else pixel_values
    boxes = full.clone()
    if "crop" in mode:
        # The mask's bounding box, by hand: `torchvision.ops.masks_to_boxes` does this, but remote code may import
        # only torch / transformers / timm / numpy / PIL. `x1`, `y1` are exclusive (one past the last lesion pixel).
        rows, cols = binary.amax(dim=3)[:, 0] > 0, binary.amax(dim=2)[:, 0] > 0  # (batch, h), (batch, w)
        y0 = rows.float().argmax(1)
        y1 = height - rows.flip(1).float().argmax(1)
        x0 = cols.float().argmax(1)
        x1 = width - cols.flip(1).float().argmax(1)
        # A square box around the lesion, grown by the margin and shifted (not cut) to stay inside the image.
        side = (torch.maximum(x1 - x0, y1 - y0).to(pixel_values.dtype) * (1 + 2 * margin)).clamp(
            min=min_side, max=min(height, width)
        )
        cx, cy = (x0 + x1).to(pixel_values.dtype) / 2, (y0 + y1).to(pixel_values.dtype) / 2
        bx0 = (cx - side / 2).clamp(min=0).minimum(width - side)
        by0 = (cy - side / 2).clamp(min=0).minimum(height - side)
        boxes = torch.stack([bx0, by0, bx0 + side, by0 + side], dim=1)
        boxes = torch.where(empty.unsqueeze(1), full, boxes)
        # Crop and resize in one bilinear resampling (`torchvision.ops.roi_align` would do it; same import rule).
        theta = torch.zeros(batch, 2, 3, dtype=pixel_values.dtype, device=pixel_values.device)
        theta[:, 0, 0] = (boxes[:, 2] - boxes[:, 0]) / width
        theta[:, 0, 2] = (boxes[:, 0] + boxes[:, 2]) / width - 1
        theta[:, 1, 1] = (boxes[:, 3] - boxes[:, 1]) / height
        theta[:, 1, 2] = (boxes[:, 1] + boxes[:, 3]) / height - 1
        grid = F.affine_grid(theta, [batch, 3, height, width], align_corners=False)
        lesion = F.grid_sample(lesion, grid, mode="bilinear", padding_mode="border", align_corners=False)
    lesion = torch.where(empty.view(batch, 1, 1, 1), pixel_values, lesion)
    return lesion, boxes, empty


class SkinDualNet(SkinLesionPreTrainedModel):
    """Dual-encoder classifier: image and lesion-image encoders fused by cross-attention, a metadata transformer,
    and a head. It owns a segmenter, so one checkpoint segments, builds the lesion image and classifies."""

    config_class = SkinDualNetConfig
    _extra_auto_classes = ("AutoModelForImageClassification",)

    def __init__(self, config: SkinDualNetConfig):
        super().__init__(config)
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
        self.ood_gate = None
        if config.ood_feature is not None:
            self.ood_gate = SkinDualNetOODGate(config.num_labels, self.ood_feature_dim(config.ood_feature))
        self.post_init()

    def ood_feature_dim(self, feature: str = "fused") -> int:
        """Width of the gate's features: the pooled image (and lesion) embeddings for `"fused"`."""
        if feature != "fused":
            raise ValueError(f"Unknown `ood_feature` {feature!r}; this model computes 'fused'.")
        return self.config.fusion_dim * (2 if self.config.use_lesion_branch else 1)

    def set_ood_gate(
        self,
        means: torch.Tensor,
        whitening: torch.Tensor,
        threshold: float,
        feature: str = "fused",
        fitted_on: str = "",
    ) -> None:
        """Install fitted gate statistics (`modeling_skinlesion.trust.fit_ood_gate` calls this) and its threshold."""
        dim = self.ood_feature_dim(feature)
        if tuple(means.shape) != (self.config.num_labels, dim) or tuple(whitening.shape) != (dim, dim):
            raise ValueError(
                f"Gate statistics must be means ({self.config.num_labels}, {dim}) and whitening ({dim}, {dim}), got "
                f"{tuple(means.shape)} and {tuple(whitening.shape)}."
            )
        device = self.classifier[-1].weight.device
        self.ood_gate = SkinDualNetOODGate(self.config.num_labels, dim).to(device)
        self.ood_gate.means.copy_(means)
        self.ood_gate.whitening.copy_(whitening)
        self.config.ood_feature, self.config.ood_threshold = feature, float(threshold)
        self.config.ood_fitted_on = fitted_on or None

    @property
    def lesion_branch(self) -> SkinDualNetImageEncoder | None:
        """The encoder that sees the lesion image (the image encoder itself when `share_encoders`)."""
        if not self.config.use_lesion_branch:
            return None
        return self.lesion_encoder if self.lesion_encoder is not None else self.image_encoder

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SkinDualNetImageEncoder):
            nn.init.trunc_normal_(module.position_embeddings, std=0.02)
        elif isinstance(module, SkinDualNetMetadataEncoder):
            for parameter in (module.cls_token, module.age_missing, module.field_embeddings):
                nn.init.trunc_normal_(parameter, std=0.02)
        elif isinstance(module, SkinDualNetOODGate):
            # Statistics a checkpoint lacks are unknown, not zero: NaN scores flag every image as not trusted.
            module.means.fill_(float("nan"))
            module.whitening.fill_(float("nan"))

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
        check_pixel_values(pixel_values, self.image_encoder.stride)
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
            lesion_mask = check_mask(lesion_mask, "lesion_mask", pixel_values)
        lesion_pixel_values, lesion_boxes, mask_empty = build_lesion_image(
            pixel_values,
            lesion_mask,
            self.config.lesion_mode,
            self.config.lesion_margin,
            self.config.min_lesion_fraction,
            min_side=self.image_encoder.stride,
        )
        return lesion_mask, lesion_pixel_values, lesion_boxes, mask_empty

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        age: torch.Tensor | None = None,
        sex_ids: torch.Tensor | None = None,
        site_ids: torch.Tensor | None = None,
        lesion_mask: torch.Tensor | None = None,
        lesion_pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SkinDualNetOutput:
        r"""
        pixel_values (`torch.Tensor` of shape `(batch_size, 3, height, width)`):
            Normalised images, at least the image encoder's total stride on each side.
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
        output_attentions, output_hidden_states, return_dict (`bool`, *optional*):
            Return the attention weights / every branch's intermediate states; `return_dict=False` gives a tuple of
            the non-`None` fields. Each defaults to the config's.
        """
        check_pixel_values(pixel_values, self.image_encoder.stride)
        batch = pixel_values.shape[0]
        for name, tensor in (("age", age), ("sex_ids", sex_ids), ("site_ids", site_ids), ("labels", labels)):
            check_batch(tensor, name, batch)
        if labels is not None and (
            labels.is_floating_point() or labels.min() < 0 or labels.max() >= self.config.num_labels
        ):
            raise ValueError(
                f"`labels` must be integer class indices in [0, {self.config.num_labels}), got {labels.tolist()}; "
                f"the labels are {self.config.id2label}."
            )

        output_attentions, output_hidden_states = self._output_options(kwargs)
        image_tokens, image_stages = self.image_encoder(pixel_values, output_hidden_states)
        lesion_boxes = mask_empty = lesion_tokens = None
        lesion_stages = ()
        if self.config.use_lesion_branch:
            if lesion_pixel_values is not None:
                check_pixel_values(lesion_pixel_values, self.lesion_branch.stride, "lesion_pixel_values")
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
        return outputs

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
                image_tokens,
                lesion_tokens,
                output_hidden_states,
                attn_implementation=attn_implementation,
                output_attentions=output_attentions,
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
        ood_score = in_distribution = None
        if self.ood_gate is not None:
            ood_score = self.ood_gate(
                torch.cat([image_embeds] + ([lesion_embeds] if lesion_embeds is not None else []), -1)
            )
            in_distribution = ood_score <= self.config.ood_threshold  # NaN (an unfitted gate) counts as out
        malignancy_score = refer = None
        if self.config.malignant_labels:
            malignant = [self.config.label2id[name] for name in self.config.malignant_labels]
            malignancy_score = logits.detach().float().softmax(-1)[:, malignant].sum(-1)
            if self.config.referral_threshold is not None:
                refer = malignancy_score >= self.config.referral_threshold
        return SkinDualNetOutput(
            loss=loss,
            logits=logits,
            image_embeds=image_embeds,
            lesion_embeds=lesion_embeds,
            metadata_embeds=metadata_embeds,
            cross_attentions=cross_attentions if output_attentions else None,
            attentions=metadata_attentions if output_attentions and self.metadata_encoder is not None else None,
            fusion_hidden_states=fusion_states if output_hidden_states else None,
            ood_score=ood_score,
            in_distribution=in_distribution,
            malignancy_score=malignancy_score,
            refer=refer,
        )


__all__ = [
    "SkinLesionSegmenterOutput",
    "SkinDualNetOutput",
    "SkinLesionPreTrainedModel",
    "SkinLesionSegmenter",
    "SkinDualNet",
    "SkinDualNetOODGate",
    "build_lesion_image",
    "energy_score",
    "mahalanobis_score",
]
