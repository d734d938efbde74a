#!/usr/bin/env python
r"""Evaluate a saved skin-dualnet model (segmenter or classifier) on a dataset split, and write ISIC submissions.

    # the validation split a training run held out (same data options and --split-seed as training):
    python scripts/evaluate_model.py --model runs/classifier \
        --dataset ham10000 --data-root ../shared/data/ham10000 --split validation --output-dir runs/classifier/eval

    # a segmenter on every image of a folder, with ISIC-challenge submission PNGs:
    python scripts/evaluate_model.py --model runs/segmenter --dataset isic2017 --data-root ../shared/data/isic2017 \
        --split all --output-dir eval/isic2017 --submission-dir eval/isic2017/submission

The model type is read from its config. The data and split options are the training scripts' (same names, same
defaults), and the split is rebuilt by the same function, so `--split validation` is the split training validated
on (give the same `--max-eval-samples` if training capped it). `--splits-file runs/x/splits.json` selects exactly
the image ids a training run recorded instead.

Segmenters are scored at the original image size after the processor's `post_process_masks` (largest component,
holes filled; `--no-mask-cleanup` turns that off) with the `lesion_segmentation` metric; classifiers with the
`lesion_classification` metric, from the segmenter's own masks unless `--masks ground_truth`. `metrics.json` lands in
`--output-dir`. `--submission-dir` writes the ISIC challenge formats: `ISIC_xxxxxxx_segmentation.png` (0/255, original
size) per image, or `predictions.csv` with an `image` column and one probability column per class.
`--lesion-focus` adds, for classifiers, the mean per-branch Grad-CAM lesion focus (share of heatmap mass on the
lesion).

Runs in one process, on the GPU when there is one (or `--device`).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))

from modeling_skinlesion.training.arguments import DataArguments, EvaluationArguments, SplitArguments, parse_arguments  # noqa: E402


@dataclass(kw_only=True)
class EvaluateModelArguments(EvaluationArguments, DataArguments, SplitArguments):
    _argument_group_name = "model and output"

    model: str = field(metadata={"help": "Saved model folder or Hub id (segmenter or classifier)."})
    output_dir: str = field(metadata={"help": "Folder for metrics.json."})
    split: Literal["validation", "test", "train", "all"] = field(
        default="validation", metadata={"help": "Which split to evaluate."}
    )
    splits_file: str | None = field(
        default=None, metadata={"help": "A training run's splits.json: evaluate exactly the ids of --split it lists."}
    )
    masks: Literal["predicted", "ground_truth"] = field(
        default="predicted",
        metadata={"help": "Classifier: lesion masks from the segmenter (as at inference) or the ground truth."},
    )
    mask_cleanup: bool = field(
        default=True, metadata={"help": "Segmenter: keep the largest component and fill holes (post_process_masks)."}
    )
    submission_dir: str | None = field(default=None, metadata={"help": "Write ISIC challenge submission files here."})
    lesion_focus: bool = field(
        default=False, metadata={"help": "Classifier: mean per-branch Grad-CAM lesion focus (slower)."}
    )

    def check(self) -> None:
        if self.split == "test" and self.test_size <= 0 and not self.splits_file:
            raise ValueError("--split test needs the --test-size training used (or --splits-file)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_arguments(EvaluateModelArguments, argv, description=__doc__)

    # The heavy imports come after parsing, so that --help and usage errors answer at once.
    import logging
    import time

    import datasets
    import numpy as np

    from modeling_skinlesion import SkinLesionMetadataProcessor, SkinLesionSegmenter
    from modeling_skinlesion.configuration_skinlesion import HAM10000_LABELS
    from modeling_skinlesion.data import SkinLesionTransform, build_dataloader, validate_files
    from modeling_skinlesion.training import evaluation as E
    from modeling_skinlesion.training import loop as T

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger = logging.getLogger("evaluate_model")
    datasets.disable_progress_bars()
    start = time.perf_counter()
    device = E.evaluation_device(args.device)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    submission_dir = Path(args.submission_dir) if args.submission_dir else None
    if submission_dir is not None:
        submission_dir.mkdir(parents=True, exist_ok=True)

    model, processor = E.load_model(args.model, device)
    task = "segmentation" if isinstance(model, SkinLesionSegmenter) else "classification"
    logger.info(f"Evaluating the {type(model).__name__} at {args.model} on {args.dataset} ({args.split}) on {device}")

    # Data: the training scripts' loaders, then the split ---------------------------------------------------------
    if task == "segmentation":
        dataset = T.load_sources(args, "segmentation")
        stratify = "source"
    else:
        names = E.model_labels(model)
        label_set = "ham10000" if names == HAM10000_LABELS else "isic2019"
        dataset = T.load_sources(args, "classification", label_set=label_set)
        stratify = "label"
    split = E.select_split(args, dataset, stratify)
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
        metrics, dropped = E.evaluate_segmenter(
            model, processor, split, args.batch_size, device, args.mask_cleanup, submission_dir
        )
        result.update(num_images=metrics["num_images"], mask_cleanup=args.mask_cleanup)
        scores = E.SEGMENTATION_SCORES[:3]
    else:
        remap = E.label_remap(split, names)
        metadata = SkinLesionMetadataProcessor.from_config(model.config)
        transform = SkinLesionTransform(processor, train=False, metadata_processor=metadata)
        dataloader = build_dataloader(split, transform, args.batch_size, num_workers=args.num_workers)
        predicted = E.predict_classifier(
            model, dataloader, device, args.masks == "ground_truth", focus_limit=len(split) if args.lesion_focus else 0
        )
        metrics = E.classification_metrics(predicted["probabilities"], remap[predicted["labels"]], names)
        dropped = predicted["dropped"]
        result.update(num_samples=metrics["num_samples"], masks=args.masks, labels=names)
        scores = E.CLASSIFICATION_SCORES
        if args.lesion_focus:
            # Mean over the images whose heatmap has any mass (an all-zero Grad-CAM has no focus to measure).
            defined = {
                branch: [v for v in values if not np.isnan(v)] for branch, values in predicted["lesion_focus"].items()
            }
            result["lesion_focus"] = {branch: float(np.mean(v)) if v else None for branch, v in defined.items()}
            result["lesion_focus_images"] = {branch: len(v) for branch, v in defined.items()}
        if submission_dir is not None:
            E.write_classification_submission(
                submission_dir / "predictions.csv", predicted["image_ids"], predicted["probabilities"], names
            )
    result.update(metrics=metrics, dropped_files=dropped, bad_files=bad_files, wall_time_s=time.perf_counter() - start)
    T.write_json(output_dir / "metrics.json", result)
    logger.info(T.format_metrics(metrics, scores))
    logger.info(
        f"Wrote {output_dir / 'metrics.json'}" + (f" and the submission in {submission_dir}" if submission_dir else "")
    )
    return result


if __name__ == "__main__":
    main()
