"""File checks: open every image and mask of a dataset and report the missing, unreadable, truncated and non-image
files by name; `_decode`, the reader the transforms use (errors name the file)."""

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
from PIL import Image as PILImage
from PIL import ImageOps

from ..image_processing_skinlesion import load_image

logger = logging.getLogger(__name__)


@dataclass
class FileValidationSummary:
    """What `validate_files` found. Each problem is `(image_id, file, reason)`."""

    num_checked: int = 0
    num_kept: int = 0
    bad_images: list[tuple[str, str, str]] = field(default_factory=list)
    bad_masks: list[tuple[str, str, str]] = field(default_factory=list)
    missing_masks: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def problems(self) -> list[tuple[str, str, str]]:
        return self.bad_images + self.bad_masks + self.missing_masks

    @property
    def bad_names(self) -> list[str]:
        return [image_id for image_id, _, _ in self.problems]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_checked": self.num_checked,
            "num_kept": self.num_kept,
            "bad_images": [list(p) for p in self.bad_images],
            "bad_masks": [list(p) for p in self.bad_masks],
            "missing_masks": [list(p) for p in self.missing_masks],
        }

    def __str__(self) -> str:
        lines = [f"Checked {self.num_checked} images: {len(self.problems)} with problems, {self.num_kept} kept."]
        for title, items in (
            ("Unreadable images", self.bad_images),
            ("Unreadable masks", self.bad_masks),
            ("Images without a mask", self.missing_masks),
        ):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  {image_id}: {reason}" for image_id, _, reason in items[:50])
                if len(items) > 50:
                    lines.append(f"  ... and {len(items) - 50} more")
        return "\n".join(lines)


def _raw_file(value: Any) -> Any:
    """A path, bytes or PIL image from an undecoded `datasets.Image` value, a path string or a PIL image."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return io.BytesIO(value["bytes"])
        return value.get("path")
    return value


def _file_name(value: Any, fallback: str) -> str:
    if isinstance(value, dict):
        return value.get("path") or fallback
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return fallback


def check_image_file(value: Any, name: str, full_decode: bool = True) -> str | None:
    """`None` if the image opens (and, with `full_decode`, decodes to the end), else the reason, naming the file."""
    raw = _raw_file(value)
    if raw is None:
        return f"{name}: no file"
    if isinstance(raw, PILImage.Image):
        return None
    try:
        with PILImage.open(raw) as image:
            if full_decode:
                # Decode JPEGs at reduced scale: the whole data stream is still read (so truncation shows), 8x faster.
                image.draft("RGB", (max(image.width // 8, 1), max(image.height // 8, 1)))
                image.load()
    except FileNotFoundError:
        return f"{name}: file not found"
    except (PILImage.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        kind = "not an image" if isinstance(error, PILImage.UnidentifiedImageError) else "unreadable or truncated"
        return f"{name}: {kind} ({error})"
    return None


def validate_files(
    dataset: datasets.Dataset,
    on_error: Literal["skip", "raise"] = "skip",
    check_masks: bool = True,
    require_masks: bool | None = None,
    full_decode: bool = True,
    num_threads: int | None = None,
) -> tuple[datasets.Dataset, FileValidationSummary]:
    """Open every image (and mask) of `dataset` and report missing, unreadable, truncated and non-image files, and
    images without a mask, by name.

    Args:
        on_error: `"skip"` returns the dataset without the bad rows and logs the summary; `"raise"` raises a
            `ValueError` holding the summary.
        check_masks: also open the mask files.
        require_masks: an image without a mask is a problem (default: `check_masks`). Use `False` for classifier
            data where masks are optional.
        full_decode: decode every file to the end (catches truncation); `False` only reads the headers.
        num_threads: parallel readers (default: the number of CPUs, at most 8).

    Returns: `(dataset_without_bad_rows, summary)`.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"`on_error` must be 'skip' or 'raise', got {on_error!r}.")
    require_masks = check_masks if require_masks is None else require_masks
    raw = dataset.select_columns(["image", "mask", "image_id"])
    raw = raw.cast_column("image", datasets.Image(decode=False)).cast_column("mask", datasets.Image(decode=False))
    rows = raw.to_list()

    def check(row: dict[str, Any]) -> tuple[str | None, str | None, bool]:
        image_error = check_image_file(row["image"], _file_name(row["image"], row["image_id"]), full_decode)
        mask_error, no_mask = None, False
        if row["mask"] is None:
            no_mask = require_masks
        elif check_masks:
            mask_error = check_image_file(row["mask"], _file_name(row["mask"], row["image_id"] + " mask"), full_decode)
        return image_error, mask_error, no_mask

    workers = num_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(check, rows, chunksize=64))
    summary = FileValidationSummary(num_checked=len(rows))
    keep = []
    for index, (row, (image_error, mask_error, no_mask)) in enumerate(zip(rows, results)):
        image_file = _file_name(row["image"], row["image_id"])
        if image_error:
            summary.bad_images.append((row["image_id"], image_file, image_error))
        if mask_error:
            summary.bad_masks.append((row["image_id"], _file_name(row["mask"], ""), mask_error))
        if no_mask:
            summary.missing_masks.append((row["image_id"], image_file, f"{image_file}: no mask"))
        if not (image_error or mask_error or no_mask):
            keep.append(index)
    summary.num_kept = len(keep)
    if summary.problems:
        if on_error == "raise":
            raise ValueError(f"Bad files in the dataset (pass on_error='skip' to drop them):\n{summary}")
        logger.warning("Skipping bad files:\n%s", summary)
    return (dataset.select(keep) if len(keep) < len(rows) else dataset), summary


def _decode(value: Any, name: str, draft_size: tuple[int, int] | None = None) -> PILImage.Image:
    """Open an image value; with `draft_size` (width, height) a JPEG is decoded at the smallest 1/2, 1/4 or 1/8
    scale that still covers it (several times faster for large images). Errors name the file."""
    raw = _raw_file(value)
    if draft_size is not None and not isinstance(raw, PILImage.Image):
        try:
            with PILImage.open(raw) as image:
                image.draft("RGB", draft_size)
                image.load()
                return ImageOps.exif_transpose(image)
        except Exception:  # noqa: BLE001 - load_image below re-raises it as a ValueError naming the file
            if hasattr(raw, "seek"):
                raw.seek(0)
    return load_image(raw, name=name)
