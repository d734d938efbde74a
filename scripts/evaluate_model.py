#!/usr/bin/env python
"""Evaluate a saved skin-dualnet model (segmenter or classifier) on a dataset split, and write ISIC submissions.

    # the validation split a training run held out (same data options and --split-seed as training):
    python scripts/evaluate_model.py --model runs/classifier \
        --dataset ham10000 --data-root ../shared/data/ham10000 --split validation --output-dir runs/classifier/eval

    # a segmenter on every image of a folder, with ISIC-challenge submission PNGs:
    python scripts/evaluate_model.py --model runs/segmenter --dataset isic2017 --data-root ../shared/data/isic2017 \
        --split all --output-dir eval/isic2017 --submission-dir eval/isic2017/submission

The model type is read from its config. The data options are the training scripts' (`--dataset`/`--data-root`
pairs, `--clinic-csv`, `--column-map`, `--hub-split`), and the split is rebuilt with the same grouped, stratified
`grouped_split` and `--val-size`/`--test-size`/`--split-seed`, so `--split validation` is the split training
validated on (give the same `--max-eval-samples` if training capped it). `--splits-file runs/x/splits.json` selects
exactly the image ids a training run recorded instead.

Segmenters are scored at the original image size after the processor's `post_process_masks` (largest component,
holes filled; `--no-mask-cleanup` turns that off) with the `lesion_segmentation` metric; classifiers with the
`lesion_classification` metric, from the segmenter's own masks unless `--masks ground_truth`. `metrics.json` lands in
`--output-dir`. `--submission-dir` writes the ISIC challenge formats: `ISIC_xxxxxxx_segmentation.png` (0/255, original
size) per image, or `predictions.csv` with an `image` column and one probability column per class.
`--lesion-focus` adds, for classifiers, the mean per-branch Grad-CAM lesion focus (share of heatmap mass on the
lesion).

Runs in one process, on the GPU when there is one (or `--device`).
"""

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import evaluate
import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from PIL import Image
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _training as T  # noqa: E402

from modeling_skinlesion import (  # noqa: E402
    SkinDualNet,
    SkinLesionImageProcessor,
    SkinLesionMetadataProcessor,
    SkinLesionSegmenter,
)
from modeling_skinlesion.configuration_skinlesion import HAM10000_LABELS  # noqa: E402
from modeling_skinlesion.data import (  # noqa: E402
    SkinLesionTransform,
    build_dataloader,
    column_values,
    grouped_split,
    label_names,
    prepare_for_transform,
    validate_files,
)
from modeling_skinlesion.image_processing_skinlesion import load_image, to_binary_mask  # noqa: E402
from modeling_skinlesion.metrics import metric_path  # noqa: E402

logger = logging.getLogger("evaluate_model")
SPLITS = ("validation", "test", "train", "all")
SEGMENTATION_SUFFIX = "_segmentation.png"
CLASSIFICATION_CSV = "predictions.csv"
SCORES = {
    "segmentation": ("dice", "jaccard", "thresholded_jaccard"),
    "classification": ("accuracy", "balanced_accuracy", "macro_auc", "ece"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", required=True, help="Saved model folder or Hub id (segmenter or classifier).")
    parser.add_argument("--output-dir", required=True, help="Folder for metrics.json.")
    data = parser.add_argument_group("data (as in the training scripts)")
    data.add_argument(
        "--dataset", nargs="+", action="extend", default=None, choices=T.DATASETS, help="Data source(s), repeatable."
    )
    data.add_argument(
        "--data-root", nargs="+", action="extend", default=None, help="Root of each --dataset, in the same order."
    )
    data.add_argument("--clinic-csv", help="CSV of a 'clinic' dataset.")
    data.add_argument("--column-map", nargs="+", action="extend", default=None, help="For clinic/hub: KEY=COLUMN.")
    data.add_argument("--hub-split", default="train", help="Split of a 'hub' dataset.")
    split = parser.add_argument_group("split")
    split.add_argument("--split", default="validation", choices=SPLITS, help="Which split to evaluate.")
    split.add_argument("--val-size", type=float, default=0.15, help="As in training.")
    split.add_argument("--test-size", type=float, default=0.0, help="As in training.")
    split.add_argument("--split-seed", type=int, default=0, help="As in training.")
    split.add_argument("--splits-file", help="A training run's splits.json: evaluate exactly the ids it lists.")
    split.add_argument(
        "--max-eval-samples", type=int, help="Cap on the images evaluated, drawn as training draws its validation cap."
    )
    split.add_argument(
        "--bad-files", default="skip", choices=("skip", "raise", "unchecked"), help="Unreadable files: skip or raise."
    )
    run = parser.add_argument_group("evaluation")
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--num-workers", type=int, default=0)
    run.add_argument("--device", default=None, help="Torch device (default: Accelerate's, the GPU when there is one).")
    run.add_argument(
        "--masks",
        default="predicted",
        choices=("predicted", "ground_truth"),
        help="Classifier: lesion masks from the segmenter (as at inference) or the ground truth where available.",
    )
    run.add_argument(
        "--mask-cleanup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Segmenter: keep the largest component and fill holes (post_process_masks).",
    )
    run.add_argument("--submission-dir", help="Write ISIC challenge submission files here.")
    run.add_argument(
        "--lesion-focus", action="store_true", help="Classifier: mean per-branch Grad-CAM lesion focus (slower)."
    )
    args = parser.parse_args(argv)
    args.dataset, args.data_root, args.column_map = args.dataset or [], args.data_root or [], args.column_map or []
    if not args.dataset or len(args.dataset) != len(args.data_root):
        parser.error(f"give one --data-root per --dataset (got {args.dataset} and {args.data_root})")
    if "clinic" in args.dataset and not args.clinic_csv:
        parser.error("--dataset clinic needs --clinic-csv and --column-map image=COLUMN ...")
    if any("=" not in pair for pair in args.column_map):
        parser.error(f"--column-map entries must be KEY=COLUMN, got {args.column_map}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.split == "test" and args.test_size <= 0 and not args.splits_file:
        parser.error("--split test needs the --test-size training used (or --splits-file)")
    return args


# --------------------------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------------------------
def load_model(name: str, device: torch.device) -> tuple[torch.nn.Module, SkinLesionImageProcessor]:
    """The saved segmenter or classifier (by its config's model type) in eval mode, and its image processor."""
    config = AutoConfig.from_pretrained(name)
    classes = {"skinlesion_segmenter": SkinLesionSegmenter, "skin_dualnet": SkinDualNet}
    if config.model_type not in classes:
        raise ValueError(f"{name} is a {config.model_type!r} model; expected one of {sorted(classes)}.")
    model = classes[config.model_type].from_pretrained(name).to(device).eval()
    try:
        processor = SkinLesionImageProcessor.from_pretrained(name)
    except OSError:
        processor = SkinLesionImageProcessor.from_model_config(model.config)
    return model, processor


def model_labels(model: SkinDualNet) -> list[str]:
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def label_remap(dataset: datasets.Dataset, names: list[str]) -> np.ndarray:
    """Dataset class index → model class index, matched by name; a `ValueError` names labels the model lacks."""
    data_names = label_names(dataset)
    present = {data_names[i] for i in set(column_values(dataset, "label")) if i >= 0}
    unknown = sorted(present - set(names))
    if unknown:
        raise ValueError(
            f"The data has labels {unknown} that the model does not predict (its labels: {names}). Fine-tune it on "
            "this label set first (scripts/finetune.py)."
        )
    return np.array([names.index(name) if name in names else -1 for name in data_names], dtype=np.int64)


def select_split(args: argparse.Namespace, dataset: datasets.Dataset, stratify_column: str) -> datasets.Dataset:
    """The rows to evaluate: a training run's recorded ids, all rows, or the grouped split rebuilt from the seed."""
    if args.splits_file:
        recorded = json.loads(Path(args.splits_file).read_text())
        if args.split not in recorded:
            raise ValueError(f"{args.splits_file} has no {args.split!r} split; it has {sorted(recorded)}.")
        wanted = set(recorded[args.split])
        ids = column_values(dataset, "image_id")
        chosen = dataset.select([i for i, image_id in enumerate(ids) if image_id in wanted])
        if len(chosen) < len(wanted):
            logger.warning(f"{len(wanted) - len(chosen)} ids of {args.splits_file} are not in the data given.")
    elif args.split == "all":
        chosen = dataset
    else:
        chosen = grouped_split(
            dataset,
            val_size=args.val_size,
            test_size=args.test_size,
            seed=args.split_seed,
            stratify_column=stratify_column,
        )[args.split]
    if args.max_eval_samples is not None and args.max_eval_samples < len(chosen):
        chosen = chosen.shuffle(seed=args.split_seed).select(range(args.max_eval_samples))
    if len(chosen) == 0:
        raise ValueError(f"The {args.split!r} split of {args.dataset} is empty.")
    return chosen


def open_file(value: Any, name: str) -> Image.Image:
    """An undecoded `datasets.Image` value (path or bytes) as a PIL image; a `ValueError` names the file."""
    if value is None:
        raise ValueError(f"{name}: no file")
    if value.get("bytes") is not None:
        return load_image(io.BytesIO(value["bytes"]), name=value.get("path") or name)
    return load_image(value["path"], name=value["path"])


# --------------------------------------------------------------------------------------------------------------------
# Segmenter
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_segmenter(
    model: SkinLesionSegmenter,
    processor: SkinLesionImageProcessor,
    dataset: datasets.Dataset,
    args: argparse.Namespace,
    device: torch.device,
    submission_dir: Path | None,
) -> tuple[dict[str, Any], list[str]]:
    """Scores at the size of each reference mask (the original image size); returns (metrics, names of the images
    that could not be read)."""
    metric = evaluate.load(metric_path("lesion_segmentation"), keep_in_memory=True)
    rows = prepare_for_transform(dataset.select_columns(["image", "mask", "image_id"]))
    dropped = []
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start : start + args.batch_size]
        images, references, ids = [], [], []
        for image, mask, image_id in zip(batch["image"], batch["mask"], batch["image_id"]):
            try:
                opened = open_file(image, image_id)
                reference = to_binary_mask(open_file(mask, f"{image_id} mask"), f"mask of {image_id}")
            except ValueError as error:
                logger.warning(f"Skipping {image_id}: {error}")
                dropped.append(image_id)
                continue
            images.append(opened)
            references.append(reference)
            ids.append(image_id)
        if not images:
            continue
        logits = model(pixel_values=processor(images)["pixel_values"].to(device)).logits
        predictions = processor.post_process_masks(
            logits,
            target_sizes=[r.shape for r in references],
            largest_component=args.mask_cleanup,
            fill_holes=args.mask_cleanup,
        )
        metric.add_batch(predictions=predictions, references=references)
        if submission_dir is not None:
            for image_id, prediction in zip(ids, predictions):
                Image.fromarray(prediction.astype(np.uint8) * 255, mode="L").save(
                    submission_dir / f"{image_id}{SEGMENTATION_SUFFIX}"
                )
    if len(dropped) == len(rows):
        raise ValueError("No image of the split could be read.")
    return metric.compute(), dropped


# --------------------------------------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------------------------------------
def lesion_focus_scores(model: SkinDualNet, inputs: dict[str, torch.Tensor], reference_masks: torch.Tensor) -> dict:
    """Hook for the per-branch Grad-CAM "lesion focus": for each image and each encoder branch, the share of the
    Grad-CAM heatmap (of the predicted class) that falls on the lesion, at the processed input's size.

    `reference_masks` `(batch_size, 1, height, width)` are the lesion masks to score against. The lesion branch's
    heatmap is placed back into the box its lesion image was cut from. Returns `{branch: [focus per image]}` (NaN for
    an all-zero heatmap). Uses the fast Grad-CAM of `modeling_skinlesion.explain`.
    """
    from modeling_skinlesion.explain import SkinDualNetGradCAM, heatmap_to_image, lesion_focus

    explanation = SkinDualNetGradCAM()(model, **inputs)
    size = tuple(inputs["pixel_values"].shape[-2:])
    boxes = explanation.outputs.lesion_boxes
    scores: dict[str, list[float]] = {}
    for branch, heatmaps in explanation.heatmaps.items():
        scores[branch] = []
        for i, heatmap in enumerate(heatmaps):
            box = boxes[i] if branch == "lesion" and boxes is not None else None
            placed = heatmap_to_image(heatmap, size, box=box, input_size=size if box is not None else None)
            scores[branch].append(lesion_focus(placed, reference_masks[i, 0] > 0.5))
    return scores


def predict_classifier(
    model: SkinDualNet,
    dataloader: torch.utils.data.DataLoader,
    device: torch.device,
    use_ground_truth_masks: bool,
    focus: bool = False,
) -> dict[str, Any]:
    """Run the classifier over `dataloader`: probabilities `(n, num_labels)`, dataset labels, image ids, the names of
    unreadable images, and (with `focus`) the per-branch lesion focus of each image."""
    probabilities, labels, ids, dropped = [], [], [], []
    focus_scores: dict[str, list[float]] = {}
    for batch in dataloader:
        dropped += batch["dropped"]
        if batch["pixel_values"].shape[0] == 0:
            continue
        batch = T.move_to(batch, device)
        inputs = {key: batch[key] for key in ("pixel_values", "age", "sex_ids", "site_ids")}
        has_mask = batch["has_mask"]
        if use_ground_truth_masks and has_mask.any():
            predicted = model.predict_lesion_mask(batch["pixel_values"])
            inputs["lesion_mask"] = torch.where(has_mask.view(-1, 1, 1, 1), batch["lesion_mask"], predicted)
        with torch.no_grad():
            outputs = model(**inputs)
        probabilities.append(outputs.logits.float().softmax(-1).cpu())
        labels.append(batch["labels"].cpu())
        ids += batch["image_id"]
        if focus and model.config.use_lesion_branch:
            # Ground-truth masks where the data has them, else the mask the model used.
            reference = torch.where(has_mask.view(-1, 1, 1, 1), batch["lesion_mask"], outputs.lesion_mask)
            for branch, values in lesion_focus_scores(model, inputs, reference).items():
                focus_scores.setdefault(branch, []).extend(values)
    if not ids:
        raise ValueError("No image of the split could be read.")
    return {
        "probabilities": torch.cat(probabilities).double().numpy(),
        "labels": torch.cat(labels).numpy(),
        "image_ids": ids,
        "dropped": dropped,
        "lesion_focus": focus_scores,
    }


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, Any]:
    metric = evaluate.load(metric_path("lesion_classification"), keep_in_memory=True)
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)  # float32 softmax rows can miss 1 by 1e-7
    return metric.compute(predictions=probabilities, references=labels.tolist(), label_names=names)


def write_classification_submission(path: Path, image_ids: list[str], probabilities: np.ndarray, names: list[str]):
    """The ISIC classification format: `image` plus one probability column per class."""
    table = pd.DataFrame(probabilities, columns=names)
    table.insert(0, "image", image_ids)
    table.to_csv(path, index=False)


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    datasets.disable_progress_bars()
    start = time.perf_counter()
    # The training helpers log through Accelerate, which needs its state; its device is the default one.
    device = torch.device(args.device) if args.device else PartialState().device
    if args.device:
        PartialState(cpu=device.type == "cpu")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    submission_dir = Path(args.submission_dir) if args.submission_dir else None
    if submission_dir is not None:
        submission_dir.mkdir(parents=True, exist_ok=True)

    model, processor = load_model(args.model, device)
    task = "segmentation" if isinstance(model, SkinLesionSegmenter) else "classification"
    logger.info(f"Evaluating the {type(model).__name__} at {args.model} on {args.dataset} ({args.split}) on {device}")

    # Data: the training scripts' loaders, then the split ---------------------------------------------------------
    if task == "segmentation":
        dataset = T.load_sources(args, "segmentation")
        stratify = "source"
    else:
        names = model_labels(model)
        dataset = T.load_sources(
            args, "classification", label_set="ham10000" if names == HAM10000_LABELS else "isic2019"
        )
        stratify = "label"
    split = select_split(args, dataset, stratify)
    bad_files = None
    if args.bad_files != "unchecked":
        split, summary = validate_files(
            split, on_error=args.bad_files, check_masks=True, require_masks=task == "segmentation"
        )
        bad_files = summary.to_dict()
    logger.info(f"{len(split)} images in the {args.split} split")

    # Predict and score -----------------------------------------------------------------------------------------------
    result: dict[str, Any] = {
        "task": task,
        "model": args.model,
        "dataset": ", ".join(args.dataset),
        "data_root": args.data_root,
        "split": args.split,
        "split_seed": args.split_seed,
        "val_size": args.val_size,
        "test_size": args.test_size,
        "splits_file": args.splits_file,
    }
    if task == "segmentation":
        metrics, dropped = evaluate_segmenter(model, processor, split, args, device, submission_dir)
        result.update(num_images=metrics["num_images"], mask_cleanup=args.mask_cleanup)
    else:
        remap = label_remap(split, names)
        metadata = SkinLesionMetadataProcessor.from_config(model.config)
        transform = SkinLesionTransform(processor, train=False, metadata_processor=metadata)
        dataloader = build_dataloader(split, transform, args.batch_size, num_workers=args.num_workers)
        predicted = predict_classifier(
            model, dataloader, device, args.masks == "ground_truth", focus=args.lesion_focus
        )
        labels = remap[predicted["labels"]]
        metrics = classification_metrics(predicted["probabilities"], labels, names)
        dropped = predicted["dropped"]
        result.update(num_samples=metrics["num_samples"], masks=args.masks, labels=names)
        if args.lesion_focus:
            # Mean over the images whose heatmap has any mass (an all-zero Grad-CAM has no focus to measure).
            defined = {
                branch: [v for v in values if not np.isnan(v)] for branch, values in predicted["lesion_focus"].items()
            }
            result["lesion_focus"] = {branch: float(np.mean(v)) if v else None for branch, v in defined.items()}
            result["lesion_focus_images"] = {branch: len(v) for branch, v in defined.items()}
        if submission_dir is not None:
            write_classification_submission(
                submission_dir / CLASSIFICATION_CSV, predicted["image_ids"], predicted["probabilities"], names
            )
    result.update(metrics=metrics, dropped_files=dropped, bad_files=bad_files, wall_time_s=time.perf_counter() - start)
    (output_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    logger.info(" ".join(f"{key} {metrics[key]:.4f}" for key in SCORES[task] if metrics.get(key) is not None))
    logger.info(
        f"Wrote {output_dir / 'metrics.json'}" + (f" and the submission in {submission_dir}" if submission_dir else "")
    )
    return result


if __name__ == "__main__":
    main()
