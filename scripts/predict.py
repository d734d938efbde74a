"""Analyse dermoscopic images with a skin-dualnet checkpoint: lesion mask, class probabilities, Grad-CAM heatmaps of
both encoders and their lesion-focus scores; or, given a segmenter checkpoint, the lesion masks alone.

    python scripts/predict.py IMAGE_OR_FOLDER --out DIR [--model MODEL] [--age A] [--sex S] [--site SITE]
        [--metadata-csv FILE] [--batch-size N] [--method gradcam] [--backend auto] [--target-class NAME]

    # masks only, from a segmenter folder (e.g. a train_segmenter.py output):
    python scripts/predict.py IMAGE_OR_FOLDER --out DIR --model runs/segmenter

Both write `DIR/summary.csv`, one row per image, appended and flushed as each result arrives (an interrupted run keeps
what it did). With a classifier (`SkinDualNet`) the row holds: file, predicted label, score, each class's probability,
lesion focus per branch, mask empty, metadata used, `ood_score`, `in_distribution` (False: not like the dermoscopic
images the model was trained on, do not trust the diagnosis), `malignancy_score` and `refer` (the referral decision
at the checkpoint's operating point); and each image gets `DIR/<image stem>/` with
- `result.json`: `probabilities` (label -> probability), `predicted_label`, `score`, `target_label` (the class the
  heatmaps explain), `lesion_focus` (per branch: share of the heatmap inside the lesion mask; null for an all-zero
  heatmap), `mask_empty` (the segmenter found no lesion and the lesion branch saw the whole image), `mask_fraction`,
  `lesion_box`, `metadata_used` / `metadata_missing` / `metadata_ignored`, the four trust fields above, and the files
  written;
- `mask.png` (the lesion mask), `mask_overlay.png`, `lesion_image.png` (what the lesion branch saw, at the
  classifier's input size) and `heatmap_image.png` / `heatmap_lesion.png` (Grad-CAM overlays of the two branches).
With a segmenter (`SkinLesionSegmenter`) each image gets `DIR/<image stem>_segmentation.png` (0/255 at the image's
size, the ISIC challenge format, the same masks as `evaluate_model.py --submission-dir`) and its row holds: file,
mask file, width, height, mask fraction, mask empty.

A folder is read (not recursively) in batches with a progress bar; a file that cannot be read as an image is reported
by name and skipped. The exit code is 0 when at least one image was analysed, 1 when none could be, 2 for bad
arguments or a model that cannot be loaded. Research use only: this is not a medical device.
"""

import argparse
import csv
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

# Only the standard library above: `--help` and usage errors answer before torch and the package are imported.
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' helpers
from _model_source import SHIPPED_MODEL, check_model_source  # noqa: E402 (standard library only)

logger = logging.getLogger("predict")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
CSV_ID_COLUMNS = ("image_id", "image", "isic_id", "file", "filename")
# The keys of modeling_skinlesion.grad_cam_backend.LIBRARY_CAM_METHODS, the first six also the fast backend's
# explaining_skinlesion.FAST_CAM_METHODS (tests/test_predict_cli.py checks both); written out so --help needs no torch.
CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "gradcamelementwise")
CAM_METHODS += ("eigencam", "eigengradcam", "kpcacam", "scorecam", "ablationcam", "randomcam")
SEGMENTATION_SUFFIX = "_segmentation.png"
# The out-of-distribution gate and the referral point (empty where the checkpoint has none).
TRUST_COLUMNS = ("ood_score", "in_distribution", "malignancy_score", "refer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog="Not a medical device."
    )
    parser.add_argument("input", type=Path, help="An image file, or a folder of images (not searched recursively).")
    parser.add_argument(
        "--model",
        default=str(SHIPPED_MODEL),
        help="A skin-dualnet classifier or segmenter: folder or Hub id (default: the shipped "
        "checkpoints/skin-dualnet-small).",
    )
    parser.add_argument("--out", required=True, type=Path, help="Output folder (created if missing).")
    parser.add_argument("--age", type=float, help="Patient age in years, for every image (default: missing).")
    parser.add_argument("--sex", help="Patient sex, male / female, for every image (default: missing).")
    parser.add_argument(
        "--site", help="Anatomical site, e.g. 'back', 'anterior torso', for every image (default: missing)."
    )
    parser.add_argument(
        "--metadata-csv",
        type=Path,
        help=f"Per-image metadata: a CSV with an image id column ({', '.join(CSV_ID_COLUMNS)}; matched to the file "
        "stem) and age / age_approx, sex, and anatom_site_general / localization / site. --age/--sex/--site fill "
        "what a row lacks (default: none).",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="Images per forward pass (default: %(default)s).")
    parser.add_argument(
        "--method",
        default="gradcam",
        choices=CAM_METHODS,
        metavar="METHOD",
        help=f"CAM method: {', '.join(CAM_METHODS[:6])} (fast or library backend) or {', '.join(CAM_METHODS[6:])} "
        "(library backend) (default: %(default)s).",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "fast", "library"],
        help="'fast': one forward, gradients to the hooked layers only; 'library': pytorch-grad-cam per branch; "
        "'auto': fast when it has the method (default: %(default)s).",
    )
    parser.add_argument(
        "--target-class", help="Explain this class (label name or index) (default: the predicted class)."
    )
    parser.add_argument("--no-explain", action="store_true", help="Skip Grad-CAM: mask and probabilities only.")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cpu).")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be positive, got {args.batch_size}.")
    if not args.input.exists():
        parser.error(f"{args.input} does not exist.")
    if args.metadata_csv is not None and not args.metadata_csv.is_file():
        parser.error(f"--metadata-csv {args.metadata_csv} is not a file.")
    return args


def collect_images(path: Path) -> tuple[list[Path], list[Path]]:
    """The image files to analyse (sorted), and the folder entries skipped for not having an image suffix."""
    if path.is_file():
        return [path], []
    entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, [p for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES]


def read_metadata_csv(path: Path) -> dict[str, dict[str, str]]:
    """Rows of a metadata CSV keyed by image id (file stem)."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        id_column = next((c for c in CSV_ID_COLUMNS if c in columns), None)
        if id_column is None:
            raise ValueError(f"{path} has no image id column; expected one of {list(CSV_ID_COLUMNS)}, got {columns}.")
        return {Path(row[id_column]).stem: row for row in reader if row.get(id_column)}


def metadata_record(args: argparse.Namespace, row: dict[str, str] | None) -> dict[str, Any] | None:
    """The CSV row (if any) completed by --age/--sex/--site, or None when nothing is known."""
    record: dict[str, Any] = dict(row or {})
    for key, value, aliases in (
        ("age", args.age, ("age", "age_approx")),
        ("sex", args.sex, ("sex",)),
        ("site", args.site, ("site", "anatom_site_general", "anatom_site_general_challenge", "localization")),
    ):
        if value is not None and not any(str(record.get(alias) or "").strip() for alias in aliases):
            for alias in aliases:
                record.pop(alias, None)
            record[key] = value
    return record or None


def output_names(files: list[Path]) -> dict[Path, str]:
    """One output name per file: its stem, made unique when two files share it (a.jpg, a.png)."""
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for path in files:
        name = path.stem
        if name in taken:
            name = f"{path.stem}_{path.suffix.lstrip('.').lower()}"
            counter = 2
            while name in taken:
                name = f"{path.stem}_{path.suffix.lstrip('.').lower()}{counter}"
                counter += 1
        taken.add(name)
        names[path] = name
    return names


def _json_number(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 6)


class Summary:
    """`DIR/summary.csv`: one row per analysed image, appended and flushed as each result arrives, so an interrupted
    run keeps what it did."""

    def __init__(self, path: Path, header: list[str]):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.open("w", newline="")
        self.writer = csv.writer(self.handle)
        self.writer.writerow(header)
        self.handle.flush()

    def add(self, row: list[Any]) -> None:
        self.writer.writerow(row)
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class ClassifierOutputs:
    """A SkinDualNet run: the analysis pipeline's result per image, written as `DIR/<name>/` and a summary row."""

    def __init__(self, args: argparse.Namespace):
        from modeling_skinlesion import SkinLesionAnalyzer
        from modeling_skinlesion.explaining_skinlesion import resolve_target_classes

        self.args = args
        self.rows = read_metadata_csv(args.metadata_csv) if args.metadata_csv is not None else {}
        self.analyzer = SkinLesionAnalyzer.from_pretrained(
            args.model, method=args.method, explain_backend=args.backend, device=args.device
        )
        config = self.analyzer.model.config
        self.labels = [config.id2label[i] for i in sorted(config.id2label)]
        if args.target_class is not None:
            resolve_target_classes(args.target_class, config.id2label, 1)
        explain = not args.no_explain
        self.run = {
            "model": str(args.model),
            "method": args.method if explain else None,
            "backend": type(self.analyzer.explainer).__name__ if explain else None,
        }
        self.header = ["file", "predicted_label", "score", *(f"p_{label}" for label in self.labels)]
        self.header += ["lesion_focus_image", "lesion_focus_lesion", "mask_empty", "metadata_used"]
        self.header += list(TRUST_COLUMNS)

    def analyse(self, paths: list[Path], images: list[Any]) -> list[dict[str, Any]]:
        records = [metadata_record(self.args, self.rows.get(path.stem)) for path in paths]
        return self.analyzer(
            images,
            metadata=records,
            target_class=self.args.target_class,
            explain=not self.args.no_explain,
            batch_size=len(images),
        )

    def write(self, result: dict[str, Any], out: Path, name: str, source: Path) -> list[Any]:
        from PIL import Image

        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        files = {"mask": "mask.png", "mask_overlay": "mask_overlay.png"}
        Image.fromarray(result["mask"].astype("uint8") * 255).save(folder / files["mask"])
        result["mask_overlay"].save(folder / files["mask_overlay"])
        if result["lesion_image"] is not None:
            files["lesion_image"] = "lesion_image.png"
            result["lesion_image"].save(folder / files["lesion_image"])
        for branch, overlay in result["heatmap_overlays"].items():
            files[f"heatmap_{branch}"] = f"heatmap_{branch}.png"
            overlay.save(folder / files[f"heatmap_{branch}"])
        height, width = result["mask"].shape
        focus = {branch: _json_number(value) for branch, value in result["lesion_focus"].items()}
        document = {
            "source": str(source),
            "image_size": {"width": width, "height": height},
            **self.run,
            "predicted_label": result["predicted_label"],
            "score": _json_number(result["score"]),
            "probabilities": {label: _json_number(p) for label, p in result["probabilities"].items()},
            "target_label": result["target_label"],
            "lesion_focus": focus,
            "mask_empty": result["mask_empty"],
            "mask_fraction": _json_number(result["mask_fraction"]),
            "lesion_box": result["lesion_box"],
            "metadata_used": result["metadata_used"],
            "metadata_missing": result["metadata_missing"],
            "metadata_ignored": result["metadata_ignored"],
            "ood_score": _json_number(result["ood_score"]),
            "in_distribution": result["in_distribution"],
            "malignancy_score": _json_number(result["malignancy_score"]),
            "refer": result["refer"],
            "files": files,
            "disclaimer": "Research use only; not a medical device.",
        }
        (folder / "result.json").write_text(json.dumps(document, indent=2) + "\n")
        return (
            [source.name, result["predicted_label"], document["score"]]
            + [document["probabilities"][label] for label in self.labels]
            + [focus.get("image"), focus.get("lesion"), result["mask_empty"]]
            + [json.dumps(result["metadata_used"], sort_keys=True)]
            + [document[key] for key in TRUST_COLUMNS]
        )


class SegmenterOutputs:
    """A SkinLesionSegmenter run: one 0/255 mask PNG per image at its own size, and a summary row."""

    header = ["file", "mask_file", "width", "height", "mask_fraction", "mask_empty"]

    def __init__(self, args: argparse.Namespace):
        import torch

        from modeling_skinlesion import SkinLesionImageProcessor, SkinLesionSegmenter

        ignored = [
            option
            for option, value in (
                ("--age", args.age),
                ("--sex", args.sex),
                ("--site", args.site),
                ("--metadata-csv", args.metadata_csv),
                ("--target-class", args.target_class),
            )
            if value is not None
        ]
        if ignored:
            logger.warning("%s is a segmenter: %s ignored (masks only).", args.model, ", ".join(ignored))
        self.torch = torch
        self.device = torch.device(args.device or "cpu")
        self.model = SkinLesionSegmenter.from_pretrained(args.model).eval().to(self.device)
        try:
            self.processor = SkinLesionImageProcessor.from_pretrained(args.model)
        except OSError:  # a training run's folder always has one; a bare save_pretrained may not
            self.processor = SkinLesionImageProcessor.from_model_config(self.model.config)

    def analyse(self, paths: list[Path], images: list[Any]) -> list[Any]:
        pixel_values = self.processor(images)["pixel_values"].to(self.device)
        with self.torch.inference_mode():
            logits = self.model(pixel_values=pixel_values).logits
        # The masks evaluate_model.py scores and submits: threshold, largest component, holes filled, image size.
        return self.processor.post_process_masks(logits, target_sizes=[(i.height, i.width) for i in images])

    def write(self, mask: Any, out: Path, name: str, source: Path) -> list[Any]:
        from PIL import Image

        out.mkdir(parents=True, exist_ok=True)
        file = f"{name}{SEGMENTATION_SUFFIX}"
        Image.fromarray(mask.astype("uint8") * 255, mode="L").save(out / file)
        height, width = mask.shape
        return [source.name, file, width, height, _json_number(mask.mean()), not mask.any()]


def load_outputs(args: argparse.Namespace) -> ClassifierOutputs | SegmenterOutputs:
    """The run for the checkpoint's kind; `ValueError`/`OSError`/`ImportError` with one line when it cannot load."""
    check_model_source(args.model)  # before the heavy imports: a wrong id fails in about half a second
    from transformers import AutoConfig

    import modeling_skinlesion

    modeling_skinlesion.register()  # registers the skin-dualnet Auto classes

    model_type = AutoConfig.from_pretrained(args.model).model_type
    if model_type == "skinlesion_segmenter":
        return SegmenterOutputs(args)
    if model_type != "skin_dualnet":
        raise ValueError(
            f"{args.model} holds a {model_type!r} model; expected a skin-dualnet classifier or segmenter."
        )
    return ClassifierOutputs(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        outputs = load_outputs(args)
    except (OSError, ValueError, ImportError) as error:
        logger.error("%s", error)
        return 2
    from tqdm.auto import tqdm

    from modeling_skinlesion.image_processing_skinlesion import load_image

    files, ignored = collect_images(args.input)
    for path in ignored:
        logger.warning("Skipping %s: not an image file (suffix %r).", path.name, path.suffix)
    names = output_names(files)
    failed: list[str] = [path.name for path in ignored]
    done = 0
    summary = Summary(args.out / "summary.csv", outputs.header)
    progress = tqdm(total=len(files), unit="image", desc="Analysing", disable=len(files) < 2)

    def analyse(batch: list[tuple[Path, Any]]) -> None:
        nonlocal done
        try:
            results = outputs.analyse([path for path, _ in batch], [image for _, image in batch])
        except ValueError as error:
            if len(batch) > 1:  # find the culprit
                for item in batch:
                    analyse([item])
                return
            logger.warning("Skipping %s: %s", batch[0][0].name, error)
            failed.append(batch[0][0].name)
            return
        for (path, _), result in zip(batch, results):
            summary.add(outputs.write(result, args.out, names[path], path))
            done += 1

    batch: list[tuple[Path, Any]] = []
    for path in files:
        try:
            batch.append((path, load_image(path)))
        except ValueError as error:
            tqdm.write(f"Skipping {path.name}: {error}", file=sys.stderr)
            failed.append(path.name)
            progress.update(1)
        if len(batch) == args.batch_size:
            analyse(batch)
            progress.update(len(batch))
            batch = []
    if batch:
        analyse(batch)
        progress.update(len(batch))
    progress.close()
    summary.close()

    logger.info("Analysed %d of %d file(s) into %s.", done, len(files) + len(ignored), args.out)
    if failed:
        logger.warning("Skipped %d file(s): %s", len(failed), ", ".join(failed))
    if done == 0:
        logger.error("No image could be analysed.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
