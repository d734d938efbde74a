"""Configurations for the skin-dualnet models: the Deep-UNet lesion segmenter and the dual-encoder classifier."""

import re

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

LESION_MODES = ("mask", "crop", "mask_crop")
HAM10000_LABELS = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
# Malignant diagnoses of HAM10000 (akiec: actinic keratosis / intraepithelial carcinoma) and ISIC 2019 (AK, SCC); a
# config's `malignant_labels` defaults to those among its labels.
MALIGNANT_LABELS = ("mel", "bcc", "akiec", "MEL", "BCC", "AK", "SCC")
# The features the gate can be fitted on (the pooled image and lesion embeddings after the fusion).
OOD_FEATURES = ("fused",)

# Canonical site vocabulary: ISIC 2019's `anatom_site_general` values plus "torso" for HAM10000's "trunk",
# which does not say anterior or posterior. Index 0 is always the "unknown" (missing) token.
SITE_VOCAB = [
    "unknown",
    "anterior torso",
    "posterior torso",
    "lateral torso",
    "torso",
    "head/neck",
    "upper extremity",
    "lower extremity",
    "palms/soles",
    "oral/genital",
]
# HAM10000 `localization` values (and a few common spellings) mapped onto the vocabulary above.
SITE_SYNONYMS = {
    "back": "posterior torso",
    "abdomen": "anterior torso",
    "chest": "anterior torso",
    "trunk": "torso",
    "face": "head/neck",
    "neck": "head/neck",
    "scalp": "head/neck",
    "ear": "head/neck",
    "head": "head/neck",
    "head neck": "head/neck",
    "hand": "upper extremity",
    "upper limb": "upper extremity",
    "foot": "lower extremity",
    "lower limb": "lower extremity",
    "acral": "palms/soles",
    "palms": "palms/soles",
    "soles": "palms/soles",
    "genital": "oral/genital",
    "oral": "oral/genital",
}
SEX_VOCAB = ["unknown", "male", "female"]
SEX_SYNONYMS = {"m": "male", "man": "male", "f": "female", "woman": "female"}


def _as_lists(config: PreTrainedConfig, *fields: str) -> None:
    """JSON and callers give lists or tuples; store lists so a saved and reloaded config compares equal."""
    for field in fields:
        setattr(config, field, list(getattr(config, field)))


def _check_encoder(config: PreTrainedConfig) -> None:
    """The fields both models share: a timm `encoder_name` and RGB input. (Whether `image_size` holds at least one
    cell of the encoder's last feature map is checked by the model, from the trunk's timm `feature_info`.)"""
    import timm

    name = config.encoder_name
    if not timm.is_model(name):
        family = re.sub(r"[\d_].*", "", name)
        close = timm.list_models(f"*{family}*")[:10] if family else []
        raise ValueError(f"`encoder_name`={name!r} is not a timm model name. Similar names: {close or 'none'}.")
    if config.num_channels != 3:
        raise ValueError(f"`num_channels` must be 3 (RGB), got {config.num_channels}.")
    for field in ("image_mean", "image_std"):
        if len(getattr(config, field)) != 3:
            raise ValueError(f"`{field}` must hold 3 numbers (R, G, B), got {getattr(config, field)}.")


def _check_positive(config: PreTrainedConfig, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v is None or v <= 0 for v in values):
            raise ValueError(f"`{field}` must be positive, got {value!r}.")


@strict
class SkinLesionSegmenterConfig(PreTrainedConfig):
    r"""
    Configuration of [`SkinLesionSegmenter`], the Deep-UNet lesion segmenter: a timm encoder tapped at all five
    stages (strides 2 to 32), an ASPP bottleneck on the deepest map, and a decoder whose skip connections pass
    through Dual Attention Gates (spatial additive attention times squeeze-excitation channel attention).

    encoder_name (`str`, *optional*, defaults to `"efficientnet_b3"`):
        Any timm model that supports `features_only=True` with five reduction stages.
    image_size (`int`, *optional*, defaults to 256):
        Side of the square input the segmenter is trained and run at; at least the encoder's total stride (timm's
        `feature_info`; 32 for the trunks we use).
    aspp_channels (`int`, *optional*, defaults to 256):
        Width of every ASPP branch and of its projection.
    aspp_rates (`list[int]`, *optional*, defaults to `[1, 2, 4]`):
        Dilation rates of the three atrous 3x3 branches. At 256 px the stride-32 map is 8x8. A 3x3 kernel with
        dilation r spans 2r+1 cells, so rates 1, 2 and 4 see 3, 5 and 9 cells: the last already covers the whole map
        from its centre. DeepLab's 6/12/18 were chosen for 33x33 maps; on an 8x8 map their taps land almost only on
        zero padding and the branches degenerate into 1x1 convolutions. Global context comes from the image-pooling
        branch.
    aspp_dropout (`float`, *optional*, defaults to 0.1):
        Dropout after the ASPP projection.
    decoder_channels (`list[int]`, *optional*, defaults to `[256, 128, 64, 32, 16]`):
        Output width of the five decoder blocks (strides 16, 8, 4, 2 and 1).
    attention_reduction (`int`, *optional*, defaults to 8):
        Channel reduction of the squeeze-excitation and of the spatial gate's intermediate width.
    bce_weight (`float`, *optional*, defaults to 1.0) and dice_weight (`float`, *optional*, defaults to 1.0):
        Weights of the binary cross-entropy and soft Dice terms of the loss.
    mask_threshold (`float`, *optional*, defaults to 0.5):
        Probability above which a pixel belongs to the lesion.
    image_mean, image_std (`list[float]`):
        Normalisation the encoder expects (ImageNet by default).
    """

    model_type = "skinlesion_segmenter"

    encoder_name: str = "efficientnet_b3"
    image_size: int = 256
    num_channels: int = 3
    aspp_channels: int = 256
    aspp_rates: list[int] | tuple[int, ...] = (1, 2, 4)
    aspp_dropout: float | int = 0.1
    decoder_channels: list[int] | tuple[int, ...] = (256, 128, 64, 32, 16)
    attention_reduction: int = 8
    bce_weight: float | int = 1.0
    dice_weight: float | int = 1.0
    mask_threshold: float = 0.5
    image_mean: list[float] | tuple[float, ...] = tuple(IMAGENET_MEAN)
    image_std: list[float] | tuple[float, ...] = tuple(IMAGENET_STD)

    def __post_init__(self, **kwargs):
        _as_lists(self, "aspp_rates", "decoder_channels", "image_mean", "image_std")
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise a `ValueError` naming the first invalid field (run once, when the config is built)."""
        _check_encoder(self)
        _check_positive(self, "image_size", "aspp_channels", "aspp_rates", "decoder_channels", "attention_reduction")
        if len(self.aspp_rates) != 3:
            raise ValueError(f"`aspp_rates` must hold three dilation rates, got {self.aspp_rates}.")
        if len(self.decoder_channels) != 5:
            raise ValueError(f"`decoder_channels` must hold five widths, got {self.decoder_channels}.")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"`mask_threshold` must lie in (0, 1), got {self.mask_threshold}.")


@strict
class SkinDualNetConfig(PreTrainedConfig):
    r"""
    Configuration of [`SkinDualNet`]: two timm encoders (original image, lesion image) whose last feature maps become
    tokens, bidirectional multi-head cross-attention between them, a metadata transformer over age, sex and
    anatomical site, and a classification head. The segmenter that builds the lesion image is nested as
    `segmenter_config`, so one checkpoint holds the whole system.

    encoder_name (`str`, *optional*, defaults to `"densenet201"`):
        timm model used for both branches.
    image_size (`int`, *optional*, defaults to 224):
        Side of the square classifier input; at least the encoder's total stride (timm's `feature_info`). The
        position embeddings hold one entry per cell of the encoder's last feature map at this size.
    share_encoders (`bool`, *optional*, defaults to `False`):
        Use one encoder (shared weights) for both branches.
    use_lesion_branch (`bool`, *optional*, defaults to `True`):
        `False` gives the single-encoder baseline: no lesion branch, no cross-attention.
    use_metadata (`bool`, *optional*, defaults to `True`):
        `False` drops the metadata transformer.
    fusion_dim, fusion_heads, fusion_layers, fusion_ffn_ratio, fusion_dropout:
        Width, heads, depth, feed-forward expansion and dropout of the cross-attention fusion. The metadata
        transformer uses the same width so its [CLS] token joins the image tokens directly.
    metadata_layers, metadata_heads:
        Depth and heads of the metadata transformer.
    metadata_ffn_ratio, metadata_dropout (`float`, *optional*):
        Feed-forward expansion and dropout of the metadata transformer; `None` (the default, and what configs
        saved before these fields existed read as) uses `fusion_ffn_ratio` / `fusion_dropout`.
    metadata_field_dropout (`float`, *optional*, defaults to 0.1):
        While training, each metadata field is hidden (set to unknown) with this probability, so the model learns
        to predict from any subset of fields.
    lesion_mode (`str`, *optional*, defaults to `"mask_crop"`):
        How the lesion image is built from the image and the mask: `"mask"` blanks the background to the
        normalisation mean, `"crop"` crops the mask's bounding box (plus `lesion_margin`) and resizes it back,
        `"mask_crop"` does both.
    lesion_margin (`float`, *optional*, defaults to 0.1):
        Margin added on each side of the bounding box, as a fraction of the box size.
    min_lesion_fraction (`float`, *optional*, defaults to 0.005):
        A mask covering less of the image than this is treated as empty: the lesion branch then sees the full
        image and the output flags `mask_empty`.
    sex_vocab, site_vocab (`list[str]`):
        Metadata vocabularies; index 0 is the "unknown" (missing) token.
    sex_synonyms, site_synonyms (`dict[str, str]`):
        Alternative spellings mapped onto the vocabularies (HAM10000's `localization` onto ISIC 2019's sites).
    age_mean, age_std (`float`):
        Age normalisation statistics (HAM10000 defaults).
    classifier_hidden_size, classifier_dropout:
        Hidden width and dropout of the head.
    class_weights (`list[float]`, *optional*):
        Per-class weights of the cross-entropy loss.
    label_smoothing (`float`, *optional*, defaults to 0.1):
        Label smoothing of the cross-entropy loss.
    logit_adjustment (`list[float]`, *optional*):
        Per-class offsets added to the logits inside the training loss only (logit-adjusted loss, Menon et al.
        2021: `tau * log(class prior)`), so the returned logits rank classes as if they were balanced and the rare
        classes are learned without class weights.
    logit_bias (`list[float]`, *optional*):
        Per-class offsets added to the returned logits before the temperature (post-hoc logit adjustment fitted on the
        validation split: `-tau * log(class prior)` with the `tau` that maximises validation balanced accuracy).
    temperature (`float`, *optional*, defaults to 1.0):
        The returned logits are divided by it: a temperature fitted on the validation split (temperature scaling)
        makes every entry point return calibrated probabilities. 1.0 = not calibrated.
    gradcam_target_layer (`str`, *optional*):
        Module, relative to each timm trunk, that Grad-CAM hooks; `None` uses the module of the trunk's last timm
        `feature_info` entry (its deepest stage, stride 32; e.g. `blocks.6` for EfficientNet, `features.norm5` for
        DenseNet).
    segmenter_config (`dict` or [`SkinLesionSegmenterConfig`], *optional*):
        Configuration of the nested segmenter.
    ood_feature (`str`, *optional*):
        The out-of-distribution gate's feature (`"fused"`: the pooled image and lesion embeddings after the fusion,
        what scripts/compare_ood_methods.py found best); `None` = no gate (the outputs' `ood_score` and
        `in_distribution` are `None`). Its class means and whitening matrix are the model's `ood_means` /
        `ood_whitening` buffers, fitted by `modeling_skinlesion.trust.fit_ood_gate`.
    ood_threshold (`float`, *optional*):
        Images whose `ood_score` (smallest squared Mahalanobis distance to a class mean) exceeds it are flagged
        out of distribution.
    ood_fitted_on (`str`, *optional*):
        What the gate was fitted on, in words (training split for the statistics, validation split for the threshold,
        the accepted share), shown by the model card; `"inherited: ..."` when a fine-tuned model kept its base's.
    malignant_labels (`list[str]`, *optional*):
        Classes whose calibrated probabilities add up to the `malignancy_score`; default: those of `mel`, `bcc`,
        `akiec` (HAM10000) or `MEL`, `BCC`, `AK`, `SCC` (ISIC 2019) among the labels.
    referral_threshold (`float`, *optional*):
        "Refer for examination" when the malignancy score is at least this; `None` = no referral point.
    referral_target_sensitivity, referral_sensitivity, referral_specificity (`float`, *optional*):
        The sensitivity the threshold was fixed for, and the sensitivity / specificity it gave on malignant vs benign
        cases of the split it was fixed on (`referral_fitted_on`).
    referral_fitted_on (`str`, *optional*):
        Where the referral threshold was fixed, in words; `"inherited: ..."` for a fine-tuned model that kept it.
    """

    model_type = "skin_dualnet"
    sub_configs_defaults = {"segmenter_config": SkinLesionSegmenterConfig}

    encoder_name: str = "densenet201"
    image_size: int = 224
    num_channels: int = 3
    share_encoders: bool = False
    use_lesion_branch: bool = True
    use_metadata: bool = True
    fusion_dim: int = 256
    fusion_heads: int = 8
    fusion_layers: int = 1
    fusion_ffn_ratio: float | int = 2.0
    fusion_dropout: float | int = 0.1
    metadata_layers: int = 2
    metadata_heads: int = 4
    metadata_ffn_ratio: float | int | None = None
    metadata_dropout: float | int | None = None
    metadata_field_dropout: float | int = 0.1
    lesion_mode: str = "mask_crop"
    lesion_margin: float | int = 0.1
    min_lesion_fraction: float = 0.005
    sex_vocab: list[str] | None = None
    site_vocab: list[str] | None = None
    sex_synonyms: dict[str, str] | None = None
    site_synonyms: dict[str, str] | None = None
    age_mean: float = 51.85
    age_std: float = 17.04
    classifier_hidden_size: int = 256
    classifier_dropout: float | int = 0.3
    class_weights: list[float] | None = None
    label_smoothing: float | int = 0.1
    logit_adjustment: list[float] | None = None
    logit_bias: list[float] | None = None
    temperature: float | int = 1.0
    gradcam_target_layer: str | None = None
    image_mean: list[float] | tuple[float, ...] = tuple(IMAGENET_MEAN)
    image_std: list[float] | tuple[float, ...] = tuple(IMAGENET_STD)
    segmenter_config: dict | PreTrainedConfig | None = None
    ood_feature: str | None = None
    ood_threshold: float | int | None = None
    ood_fitted_on: str | None = None
    malignant_labels: list[str] | None = None
    referral_threshold: float | int | None = None
    referral_target_sensitivity: float | int | None = None
    referral_sensitivity: float | int | None = None
    referral_specificity: float | int | None = None
    referral_fitted_on: str | None = None

    def __post_init__(self, **kwargs):
        if self.id2label is None and kwargs.get("num_labels") is None:
            self.id2label = dict(enumerate(HAM10000_LABELS))
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.label2id = {v: k for k, v in self.id2label.items()}
        if self.malignant_labels is None and self.id2label is not None:
            self.malignant_labels = [name for name in self.id2label.values() if name in MALIGNANT_LABELS]
        elif self.malignant_labels is not None:
            self.malignant_labels = list(self.malignant_labels)
        self.sex_vocab = list(self.sex_vocab) if self.sex_vocab is not None else list(SEX_VOCAB)
        self.site_vocab = list(self.site_vocab) if self.site_vocab is not None else list(SITE_VOCAB)
        self.sex_synonyms = dict(self.sex_synonyms) if self.sex_synonyms is not None else dict(SEX_SYNONYMS)
        self.site_synonyms = dict(self.site_synonyms) if self.site_synonyms is not None else dict(SITE_SYNONYMS)
        _as_lists(self, "image_mean", "image_std")
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise a `ValueError` naming the first invalid field (run once, when the config is built)."""
        _check_encoder(self)
        _check_positive(
            self,
            "image_size",
            "fusion_dim",
            "fusion_heads",
            "fusion_layers",
            "fusion_ffn_ratio",
            "metadata_layers",
            "metadata_heads",
            "classifier_hidden_size",
            "age_std",
        )
        if self.metadata_ffn_ratio is not None:
            _check_positive(self, "metadata_ffn_ratio")
        for heads in ("fusion_heads", "metadata_heads"):
            if self.fusion_dim % getattr(self, heads) != 0:
                raise ValueError(
                    f"`fusion_dim` ({self.fusion_dim}) must be divisible by `{heads}` ({getattr(self, heads)})."
                )
        if self.num_labels < 2:
            raise ValueError(f"`num_labels` must be at least 2, got {self.num_labels}.")
        if self.class_weights is not None and (
            len(self.class_weights) != self.num_labels or any(w < 0 for w in self.class_weights)
        ):
            raise ValueError(
                f"`class_weights` must hold {self.num_labels} non-negative numbers (one per label), "
                f"got {self.class_weights}."
            )
        if self.logit_adjustment is not None and len(self.logit_adjustment) != self.num_labels:
            raise ValueError(
                f"`logit_adjustment` must hold {self.num_labels} numbers (one per label), got {self.logit_adjustment}."
            )
        if self.logit_bias is not None and len(self.logit_bias) != self.num_labels:
            raise ValueError(
                f"`logit_bias` must hold {self.num_labels} numbers (one per label), got {self.logit_bias}."
            )
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be positive, got {self.temperature}.")
        for vocab in ("sex_vocab", "site_vocab"):
            if not getattr(self, vocab) or getattr(self, vocab)[0] != "unknown":
                raise ValueError(f"`{vocab}` must start with the 'unknown' token, got {getattr(self, vocab)}.")
        if self.lesion_mode not in LESION_MODES:
            raise ValueError(f"`lesion_mode` must be one of {LESION_MODES}, got {self.lesion_mode!r}.")
        for field in ("fusion_dropout", "metadata_dropout", "metadata_field_dropout", "classifier_dropout"):
            value = getattr(self, field)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"`{field}` must lie in [0, 1), got {value}.")
        if not 0.0 <= self.min_lesion_fraction < 1.0:
            raise ValueError(f"`min_lesion_fraction` must lie in [0, 1), got {self.min_lesion_fraction}.")
        if self.lesion_margin < 0:
            raise ValueError(f"`lesion_margin` must be non-negative, got {self.lesion_margin}.")
        if self.ood_feature is not None and self.ood_feature not in OOD_FEATURES:
            raise ValueError(f"`ood_feature` must be one of {OOD_FEATURES} or None, got {self.ood_feature!r}.")
        if self.ood_feature is not None and self.ood_threshold is None:
            raise ValueError("`ood_threshold` must be set when `ood_feature` is (fit the gate with `fit_ood_gate`).")
        unknown = sorted(set(self.malignant_labels or []) - set((self.id2label or {}).values()))
        if unknown:
            raise ValueError(
                f"`malignant_labels` {unknown} are not labels of the model; its labels are "
                f"{list((self.id2label or {}).values())}."
            )
        if self.referral_threshold is not None and not self.malignant_labels:
            raise ValueError("`referral_threshold` needs `malignant_labels` (none of the labels is malignant).")

    def label_to_id(self, label: str | int) -> int:
        """Class index of a label name (or a checked index); a `ValueError` lists the valid labels."""
        if isinstance(label, int) and not isinstance(label, bool):
            if 0 <= label < self.num_labels:
                return label
            raise ValueError(f"Label index {label} is out of range [0, {self.num_labels}); labels: {self.id2label}.")
        if label not in self.label2id:
            raise ValueError(f"Unknown label {label!r}; valid labels: {list(self.label2id)}.")
        return int(self.label2id[label])


__all__ = ["SkinLesionSegmenterConfig", "SkinDualNetConfig"]
