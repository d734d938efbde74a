"""Pre- and post-processing for skin-dualnet: images and masks, lesion-mask clean-up, and patient metadata."""

import io
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.utils import logging

logger = logging.get_logger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
AGE_KEYS = ("age", "age_approx")
SEX_KEYS = ("sex",)
SITE_KEYS = ("anatom_site_general", "anatom_site_general_challenge", "localization", "site", "anatom_site")
MISSING_STRINGS = {"", "nan", "none", "null", "unknown", "na", "n/a"}


def _open_image(image: Any, label: str) -> Image.Image:
    """Decode a path, bytes or file object with PIL and apply its EXIF rotation; errors name `label`."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = io.BytesIO(image)
    try:
        with Image.open(image) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)
    except FileNotFoundError as error:
        raise ValueError(f"Image file not found: {label}") from error
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"Image {label} is too large ({error}); the limit is PIL.Image.MAX_IMAGE_PIXELS = "
            f"{Image.MAX_IMAGE_PIXELS} pixels."
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(
            f"Cannot read {label} as an image (unreadable, truncated or not an image): {error}"
        ) from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit and 32-bit grey scaled to 8 bits, transparency flattened onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        # 16-bit files use 0-65535; 32-bit ones hold either range.
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 1.0
        image = Image.fromarray((np.clip(array * scale, 0, 255) + 0.5).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels are composited onto white, as an image viewer would show them.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(image: Any, name: str | None = None) -> Image.Image:
    """The one image reader: a path, bytes, file object or PIL image as an 8-bit RGB PIL image.

    Decodes the file, applies its EXIF rotation, scales 16-bit and 32-bit grey to 8 bits and flattens transparency
    onto white. The processor, the pipeline, the Space and the command line all read images through it. Raises a
    `ValueError` naming the file (`name`, else the path) when it is missing, not an image, truncated, or a
    decompression bomb (larger than `PIL.Image.MAX_IMAGE_PIXELS`).
    """
    if isinstance(image, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(image))
    label = name or (os.fspath(image) if isinstance(image, (str, os.PathLike)) else type(image).__name__)
    return _to_rgb(_open_image(image, label))


def _array_to_array(array: np.ndarray, name: str) -> np.ndarray:
    """RGB float32 array in [0, 1], shape (height, width, 3), from HW, HWC or CHW arrays of any common dtype."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # (c, h, w) -> (h, w, c)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or min(array.shape[:2]) == 0:
        raise ValueError(
            f"{name} must be an image array of shape (height, width), (height, width, 1|3|4) or (1|3|4, height, "
            f"width), got {array.shape}."
        )
    if array.dtype == np.bool_:
        array = array.astype(np.float32)
    elif array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"{name} contains NaN or infinite values.")
        if array.max(initial=0) > 1.0:  # 0-255 data stored as int32 or float
            array = array / (65535.0 if array.max() > 255 else 255.0)
    else:
        raise ValueError(f"{name} has unsupported dtype {array.dtype}.")
    if array.shape[-1] == 4:
        alpha = array[..., 3:]
        array = array[..., :3] * alpha + (1 - alpha)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.clip(array, 0.0, 1.0)


def to_rgb_array(image: Any, name: str = "image") -> np.ndarray:
    """Any supported image input (PIL, path, bytes, numpy, torch) as an RGB float32 array in [0, 1] of shape
    (h, w, 3). Files and PIL images go through `load_image`; arrays keep their precision (no 8-bit step)."""
    if isinstance(image, torch.Tensor):
        return _array_to_array(image.detach().cpu().numpy(), name)
    if isinstance(image, np.ndarray):
        return _array_to_array(image, name)
    if isinstance(image, (str, os.PathLike)):
        return np.asarray(load_image(image), dtype=np.float32) / 255.0  # errors name the path
    if isinstance(image, (bytes, bytearray, Image.Image)) or hasattr(image, "read"):
        return np.asarray(load_image(image, name), dtype=np.float32) / 255.0
    raise ValueError(
        f"{name} must be a PIL image, a numpy array, a torch tensor or a file path, got {type(image).__name__}."
    )


def to_binary_mask(mask: Any, name: str = "mask") -> np.ndarray:
    """A mask (PIL, numpy, torch, path; 0/1, 0/255 or probabilities) as a boolean array of shape (h, w)."""
    if isinstance(mask, (str, os.PathLike)):
        mask = _open_image(mask, os.fspath(mask))  # not `load_image`: a mask keeps its own mode (grey, palette)
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise ValueError(f"{name} must be a PIL image, numpy array, torch tensor or path, got {type(mask).__name__}.")
    mask = np.squeeze(mask)
    if mask.ndim == 3:  # an RGB mask: any channel on
        mask = mask.max(axis=-1)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask, got shape {mask.shape}.")
    threshold = 127 if mask.dtype == np.uint8 or mask.max(initial=0) > 1 else 0.5
    return mask > threshold


def _components(mask: torch.Tensor, max_iterations: int = 100_000) -> torch.Tensor:
    """Label 8-connected components of a boolean mask `(h, w)` by propagating the maximum pixel index through the
    mask; returns the label map (0 = background). `scipy.ndimage.label` does this, but remote code may not import
    SciPy, so it is written in torch."""
    height, width = mask.shape
    index = torch.arange(1, height * width + 1, dtype=torch.float32).view(1, 1, height, width)
    labels = torch.where(mask, index, torch.zeros_like(index))
    for _ in range(max_iterations):
        spread = F.max_pool2d(labels, 3, stride=1, padding=1) * mask
        # Pointer jumping: a label is the index of a pixel of the same component whose label is never smaller; taking
        # that pixel's label lets labels travel far per step (about 10x fewer steps than 1 pixel per step).
        flat = spread.flatten()
        spread = flat[(flat.long() - 1).clamp(min=0)].view_as(spread) * mask
        if torch.equal(spread, labels):
            break
        labels = spread
    return labels[0, 0].long()


def clean_mask(mask: np.ndarray, largest_component: bool = True, fill_holes: bool = True) -> np.ndarray:
    """Keep the largest 8-connected component and fill holes (background not connected to the border)."""
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))
    if largest_component and tensor.any():
        labels = _components(tensor)
        values, counts = torch.unique(labels[labels > 0], return_counts=True)
        tensor = labels == values[counts.argmax()]
    if fill_holes and tensor.any():
        background = ~tensor
        # A background frame joins all border-touching background into one region; the rest are holes.
        labels = _components(F.pad(background[None], (1, 1, 1, 1), value=True)[0])
        outside = (labels == labels[0, 0])[1:-1, 1:-1]
        tensor = tensor | (background & ~outside)
    return tensor.numpy()


class SkinLesionImageProcessor(BaseImageProcessor):
    r"""
    Resizes, rescales and normalises dermoscopic images (and, optionally, their lesion masks) for skin-dualnet, and
    turns segmenter logits back into clean binary masks at the original image size.

    Args:
        size (`dict[str, int]`, *optional*, defaults to `{"height": 224, "width": 224}`):
            Output size.
        image_mean, image_std (`list[float]`, *optional*, default to ImageNet statistics):
            Normalisation.
        do_resize, do_normalize (`bool`, *optional*, default to `True`).
        mask_threshold (`float`, *optional*, defaults to 0.5):
            Probability threshold of `post_process_masks`.

    Accepts PIL images (any mode: grayscale, RGBA, palette, 16-bit; EXIF rotation applied), numpy arrays and torch
    tensors (HW, HWC or CHW; uint8, uint16, bool or float), or file paths.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict[str, int] | int | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        do_resize: bool = True,
        do_normalize: bool = True,
        mask_threshold: float = 0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(size, int):
            size = {"height": size, "width": size}
        self.size = dict(size) if size is not None else {"height": 224, "width": 224}
        if self.size.get("height", 0) <= 0 or self.size.get("width", 0) <= 0:
            raise ValueError(f"`size` must have positive 'height' and 'width', got {self.size}.")
        self.image_mean = list(image_mean) if image_mean is not None else list(IMAGENET_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(IMAGENET_STD)
        self.do_resize = do_resize
        self.do_normalize = do_normalize
        self.mask_threshold = mask_threshold

    @classmethod
    def from_model_config(cls, config: Any) -> "SkinLesionImageProcessor":
        """The processor that matches a `SkinDualNetConfig` or `SkinLesionSegmenterConfig`."""
        return cls(size=config.image_size, image_mean=config.image_mean, image_std=config.image_std)

    def _to_tensor(self, image: Any, name: str) -> torch.Tensor:
        array = to_rgb_array(image, name)
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)  # (h, w, 3) -> (3, h, w)

    def preprocess(
        self,
        images: Any,
        masks: Any | None = None,
        return_tensors: str | None = "pt",
        size: dict[str, int] | int | None = None,
        do_resize: bool | None = None,
        do_normalize: bool | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Pre-process one image or a list of images. `size`, `do_resize`, `do_normalize`, `image_mean` and
        `image_std` override the processor's own settings for this call; other keywords are refused.

        Returns a `BatchFeature` with `pixel_values` `(batch_size, 3, height, width)`, and with `masks` also
        `lesion_mask` `(batch_size, 1, height, width)` (nearest-resized, 0/1).
        """
        unknown = sorted(set(kwargs) - {"data_format", "input_data_format"})
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for `SkinLesionImageProcessor.preprocess`; it takes `masks`, "
                "`return_tensors`, `size`, `do_resize`, `do_normalize`, `image_mean` and `image_std`."
            )
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        if not images:
            raise ValueError("`images` is empty; pass at least one image.")
        size = size if size is not None else self.size
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if not isinstance(size, dict) or size.get("height", 0) <= 0 or size.get("width", 0) <= 0:
            raise ValueError(f"`size` must be a positive int or a dict with 'height' and 'width', got {size!r}.")
        do_resize = self.do_resize if do_resize is None else do_resize
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        image_mean = list(image_mean) if image_mean is not None else self.image_mean
        image_std = list(image_std) if image_std is not None else self.image_std
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError(f"`image_mean`/`image_std` need 3 values (std > 0), got {image_mean} / {image_std}.")
        target = (size["height"], size["width"])
        tensors = []
        for i, image in enumerate(images):
            tensor = self._to_tensor(image, f"images[{i}]")
            if do_resize and tuple(tensor.shape[-2:]) != target:
                tensor = F.interpolate(
                    tensor[None], size=target, mode="bilinear", antialias=True, align_corners=False
                )[0]
            tensors.append(tensor)
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"Images have different sizes {sorted(shapes)} and `do_resize=False`; resize them first.")
        pixel_values = torch.stack(tensors).clamp(0, 1)
        if do_normalize:
            mean = torch.tensor(image_mean).view(1, 3, 1, 1)
            std = torch.tensor(image_std).view(1, 3, 1, 1)
            pixel_values = (pixel_values - mean) / std
        data = {"pixel_values": pixel_values}
        if masks is not None:
            masks = [masks] if single else list(masks)
            if len(masks) != len(images):
                raise ValueError(f"Got {len(images)} images but {len(masks)} masks; pass one mask per image.")
            resized = []
            for i, mask in enumerate(masks):
                binary = torch.from_numpy(to_binary_mask(mask, f"masks[{i}]")).float()[None, None]
                resized.append(F.interpolate(binary, size=tuple(pixel_values.shape[-2:]), mode="nearest")[0])
            data["lesion_mask"] = torch.stack(resized)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def post_process_masks(
        self,
        logits: torch.Tensor,
        target_sizes: Iterable[tuple[int, int]] | None = None,
        threshold: float | None = None,
        largest_component: bool = True,
        fill_holes: bool = True,
    ) -> list[np.ndarray]:
        """Segmenter logits `(batch_size, 1, h, w)` → boolean masks, one per image, at `target_sizes` (each
        `(height, width)`, e.g. the original image sizes), optionally keeping the largest connected component and
        filling holes."""
        if logits.ndim != 4 or logits.shape[1] != 1:
            raise ValueError(f"`logits` must have shape (batch_size, 1, height, width), got {tuple(logits.shape)}.")
        threshold = self.mask_threshold if threshold is None else threshold
        sizes = list(target_sizes) if target_sizes is not None else [tuple(logits.shape[-2:])] * logits.shape[0]
        if len(sizes) != logits.shape[0]:
            raise ValueError(f"Got {logits.shape[0]} masks but {len(sizes)} `target_sizes`.")
        results = []
        for mask_logits, target in zip(logits.detach().float().cpu(), sizes):
            binary = mask_logits.sigmoid()[0] > threshold
            binary = clean_mask(binary.numpy(), largest_component, fill_holes)
            if tuple(target) != binary.shape:
                resized = F.interpolate(
                    torch.from_numpy(binary).float()[None, None], size=tuple(target), mode="bilinear"
                )
                binary = resized[0, 0].numpy() > 0.5
            results.append(binary)
        return results


class SkinLesionMetadataProcessor:
    """Turns raw patient records into the classifier's metadata inputs, with the vocabularies of the model config.

    A record is a mapping (dict, pandas row) with any of: `age` / `age_approx`; `sex`; and the anatomical site as
    `anatom_site_general` (ISIC 2019), `localization` (HAM10000) or `site`. Known synonyms are mapped (HAM10000's
    "back" → "posterior torso", ...). Fallbacks, each logged once per value: an unknown string becomes the
    "unknown" token; an age that is negative, above 120 or NaN becomes missing.

    Example:
        >>> metadata = SkinLesionMetadataProcessor.from_config(model.config)
        >>> inputs = metadata([{"age": 55, "sex": "female", "anatom_site_general": "anterior torso"}])
        >>> model(pixel_values=pixel_values, **inputs)
    """

    def __init__(
        self,
        sex_vocab: list[str],
        site_vocab: list[str],
        sex_synonyms: Mapping[str, str] | None = None,
        site_synonyms: Mapping[str, str] | None = None,
        max_age: float = 120.0,
    ):
        self.sex_vocab = list(sex_vocab)
        self.site_vocab = list(site_vocab)
        self.sex_synonyms = {self._norm(k): v for k, v in (sex_synonyms or {}).items()}
        self.site_synonyms = {self._norm(k): v for k, v in (site_synonyms or {}).items()}
        self.max_age = max_age
        self._warned: set[tuple[str, str]] = set()

    @classmethod
    def from_config(cls, config: Any) -> "SkinLesionMetadataProcessor":
        return cls(config.sex_vocab, config.site_vocab, config.sex_synonyms, config.site_synonyms)

    @staticmethod
    def _norm(value: str) -> str:
        return " ".join(str(value).strip().lower().replace("_", " ").split())

    def _warn_once(self, field: str, value: Any, message: str) -> None:
        key = (field, repr(value))
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    @staticmethod
    def _get(record: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
        for key in keys:
            if key in record:
                return record[key]
        return None

    def parse_age(self, value: Any) -> float | None:
        if value is None or (isinstance(value, str) and self._norm(value) in MISSING_STRINGS):
            return None
        try:
            age = float(value)
        except (TypeError, ValueError):
            self._warn_once("age", value, f"Age {value!r} is not a number; treating it as missing.")
            return None
        if math.isnan(age):
            return None
        if age < 0 or age > self.max_age:
            self._warn_once("age", value, f"Age {value!r} is outside [0, {self.max_age:g}]; treating it as missing.")
            return None
        return age

    def _parse_category(self, field: str, value: Any, vocab: list[str], synonyms: Mapping[str, str]) -> str | None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        text = self._norm(value)
        if text in MISSING_STRINGS:
            return None
        text = synonyms.get(text, text)
        lookup = {self._norm(v): v for v in vocab[1:]}
        if self._norm(text) in lookup:
            return lookup[self._norm(text)]
        self._warn_once(field, value, f"Unknown {field} {value!r}; treating it as missing. Known values: {vocab[1:]}.")
        return None

    def normalize_record(self, record: Mapping[str, Any] | None) -> dict[str, Any]:
        """One record as `{"age": float | None, "sex": str | None, "site": str | None}` (None = missing)."""
        record = record if record is not None else {}
        if not isinstance(record, Mapping) and hasattr(record, "to_dict"):
            record = record.to_dict()
        if not isinstance(record, Mapping):
            raise ValueError(f"A metadata record must be a mapping (dict or pandas row), got {type(record).__name__}.")
        return {
            "age": self.parse_age(self._get(record, AGE_KEYS)),
            "sex": self._parse_category("sex", self._get(record, SEX_KEYS), self.sex_vocab, self.sex_synonyms),
            "site": self._parse_category(
                "anatomical site", self._get(record, SITE_KEYS), self.site_vocab, self.site_synonyms
            ),
        }

    def encode(self, parsed: list[dict[str, Any]], return_tensors: str = "pt") -> BatchFeature:
        """Records already normalised by `normalize_record` → `BatchFeature` with `age` (float, NaN = missing),
        `sex_ids` and `site_ids` (0 = unknown)."""
        data = {
            "age": torch.tensor([p["age"] if p["age"] is not None else float("nan") for p in parsed]),
            "sex_ids": torch.tensor([self.sex_vocab.index(p["sex"]) if p["sex"] else 0 for p in parsed]),
            "site_ids": torch.tensor([self.site_vocab.index(p["site"]) if p["site"] else 0 for p in parsed]),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(self, records: Any = None, batch_size: int | None = None, return_tensors: str = "pt") -> BatchFeature:
        """Records (a dict, a list of dicts, a pandas DataFrame or row, or None for "no metadata" with
        `batch_size`) → `BatchFeature` with `age` (float, NaN = missing), `sex_ids` and `site_ids` (0 = unknown)."""
        if records is None:
            records = [None] * (batch_size or 1)
        elif isinstance(records, Mapping) or (hasattr(records, "to_dict") and not hasattr(records, "columns")):
            records = [records]  # one record (dict or pandas row)
        records = metadata_records(records, None)
        if batch_size is not None and len(records) != batch_size:
            raise ValueError(f"Got {len(records)} metadata records for a batch of {batch_size} images.")
        parsed = [self.normalize_record(record) for record in records]
        return self.encode(parsed, return_tensors)


def metadata_records(metadata: Any, count: int | None) -> list[Any]:
    """One metadata record (or None) per image: `metadata` may be None (no metadata for `count` images), one mapping
    for every image, a list with one mapping (or None) per image, or a pandas DataFrame with one row per image. With
    `count` None, a list or DataFrame gives as many records as it holds."""
    if metadata is None:
        return [None] * (count or 1)
    if isinstance(metadata, Mapping):
        return [metadata] * (count or 1)
    if hasattr(metadata, "to_dict") and hasattr(metadata, "columns"):  # pandas DataFrame
        metadata = metadata.to_dict(orient="records")
    if not isinstance(metadata, (list, tuple)):
        raise ValueError(
            f"`metadata` must be a mapping such as {{'age': 55, 'sex': 'female', 'site': 'back'}}, a list of them, "
            f"or a DataFrame, got {type(metadata).__name__}."
        )
    if count is not None and len(metadata) != count:
        raise ValueError(
            f"`metadata` holds {len(metadata)} records for {count} images; pass one per image (None where unknown), "
            "or a single mapping for all."
        )
    return list(metadata)


__all__ = [
    "SkinLesionImageProcessor",
    "SkinLesionMetadataProcessor",
    "clean_mask",
    "load_image",
    "metadata_records",
    "to_binary_mask",
    "to_rgb_array",
]
