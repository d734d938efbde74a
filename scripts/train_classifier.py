"""Train the skin-dualnet classifier (dual image encoders, cross-attention fusion, metadata) with Accelerate.

    accelerate launch scripts/train_classifier.py \
        --config configuration/skin-dualnet.json --segmenter runs/segmenter \
        --dataset ham10000 --data-root ../shared/data/ham10000 \
        --output-dir runs/classifier --epochs 30 --batch-size 16 --class-weights balanced

The segmenter stays frozen. Training uses the ground-truth lesion masks of the images that have one and the
segmenter's predicted masks for the others; validation uses the segmenter's masks (as at inference) unless
`--eval-masks ground_truth`. `--segmenter PATH` puts a trained segmenter inside the classifier, so the saved folder
is the whole system. Each epoch is scored by the shipped `lesion_classification` metric; the epoch with the best
balanced accuracy is kept and saved with its image processor, next to metrics.json, splits.json and a model card.
Multi-GPU, multi-node and CPU multi-process launches are as for train_segmenter.py (`accelerate launch --multi_gpu
...` or `torchrun --nproc_per_node N ...`).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _training as T  # noqa: E402

from modeling_skinlesion import (  # noqa: E402
    SkinDualNet,
    SkinDualNetConfig,
    SkinLesionImageProcessor,
    SkinLesionMetadataProcessor,
    SkinLesionSegmenter,
)
from modeling_skinlesion.data import (  # noqa: E402
    SkinLesionTransform,
    balanced_class_weights,
    label_names,
)

logger = get_logger(__name__)
SCORES = ("accuracy", "balanced_accuracy", "macro_auc", "ece")


@dataclass
class ClassifierArguments(T.TrainingArguments):
    segmenter: str | None = field(
        default=None, metadata={"help": "Trained segmenter folder to put inside the classifier (it stays frozen)."}
    )
    class_weights: Literal["balanced", "none"] = field(
        default="balanced", metadata={"help": "Cross-entropy class weights: n / (k * n_class) from the train split."}
    )
    label_set: Literal["ham10000", "isic2019"] = field(
        default="ham10000", metadata={"help": "Class names for HAM10000 (use isic2019 to combine with ISIC 2019)."}
    )
    train_masks: Literal["ground_truth", "predicted"] = field(
        default="ground_truth", metadata={"help": "Lesion masks while training, where the data has them."}
    )
    eval_masks: Literal["predicted", "ground_truth"] = field(
        default="predicted", metadata={"help": "Lesion masks for validation (predicted = as at inference)."}
    )


def lesion_masks(model, batch: dict, use_ground_truth: bool, accelerator: Accelerator) -> torch.Tensor | None:
    """Ground-truth masks where a row has one (if asked), the segmenter's elsewhere; `None` lets the model predict
    them all itself."""
    has_mask = batch["has_mask"]
    if not use_ground_truth or not has_mask.any():
        return None
    if has_mask.all():
        return batch["lesion_mask"]
    predicted = accelerator.unwrap_model(model).predict_lesion_mask(batch["pixel_values"])
    return torch.where(has_mask.view(-1, 1, 1, 1), batch["lesion_mask"], predicted)


@torch.no_grad()
def predict_probabilities(
    model, dataloader, accelerator: Accelerator, use_ground_truth: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and labels over the whole (sharded) dataloader, gathered across processes, each image
    once. Call `T.broadcast_buffers` first on a model that was trained with DDP."""
    model = accelerator.unwrap_model(model)  # no DDP collectives inside forward: processes may have empty batches
    model.eval()
    indices, probabilities, labels = [], [], []
    for batch in dataloader:
        if batch["pixel_values"].shape[0] == 0:
            continue
        logits = model(
            pixel_values=batch["pixel_values"],
            age=batch["age"],
            sex_ids=batch["sex_ids"],
            site_ids=batch["site_ids"],
            lesion_mask=lesion_masks(model, batch, use_ground_truth, accelerator),
        ).logits
        indices.append(batch["index"])
        probabilities.append(logits.float().softmax(-1))
        labels.append(batch["labels"])
    if not indices:
        probabilities = [torch.zeros(0, model.config.num_labels, device=accelerator.device)]
        labels = [torch.zeros(0, dtype=torch.long, device=accelerator.device)]
    _, probability, label = T.gather_by_index(accelerator, indices, probabilities, labels)
    return probability, label


def evaluate_classifier(model, dataloader, accelerator: Accelerator, use_ground_truth: bool) -> dict:
    """Validation scores over the whole (sharded) dataloader, gathered across processes, each image once."""
    T.broadcast_buffers(accelerator, model)
    probability, label = predict_probabilities(model, dataloader, accelerator, use_ground_truth)
    config = accelerator.unwrap_model(model).config
    names = [config.id2label[i] for i in range(config.num_labels)]
    return T.classification_metrics(probability, label, names)


def main(argv: list[str] | None = None) -> dict:
    args = T.parse_arguments(ClassifierArguments, argv, description=__doc__)
    output_dir = Path(args.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    timer = T.Timer()

    # Accelerator, logging, seed ------------------------------------------------------------------------------------
    accelerator = T.build_accelerator(args, output_dir)
    T.setup_logging(accelerator)
    logger.info(accelerator.state, main_process_only=True)
    set_seed(args.seed)
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    # Data: labelled images (masks where available), grouped split stratified by class, file check ----------------
    with accelerator.main_process_first():
        dataset = T.load_sources(args, "classification", label_set=args.label_set)
        splits, bad_files = T.prepare_splits(args, dataset, stratify_column="label", require_masks=False)
    split_summary = T.describe_split(splits)
    logger.info(f"Split: {split_summary}")
    if accelerator.is_main_process:
        T.write_split_ids(output_dir / "splits.json", splits, args)
    names = label_names(splits["train"])
    weights = balanced_class_weights(splits["train"]) if args.class_weights == "balanced" else None

    # Model: the dataset's labels, the class weights, and the trained segmenter inside --------------------------------
    segmenter = SkinLesionSegmenter.from_pretrained(args.segmenter) if args.segmenter else None
    if T.is_model_folder(args.config):
        model = SkinDualNet.from_pretrained(args.config)
        if [model.config.id2label[i] for i in range(model.config.num_labels)] != names:
            raise ValueError(
                f"The model at {args.config} predicts {list(model.config.id2label.values())} but the data has the "
                f"labels {names}; use scripts/finetune.py for a different label set (a new head)."
            )
        model.config.class_weights = weights
        if segmenter is not None:
            model.segmenter.load_state_dict(segmenter.state_dict())
    else:
        overrides = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
        if segmenter is not None:
            overrides["segmenter_config"] = segmenter.config.to_dict()
        config = AutoConfig.from_pretrained(args.config, class_weights=weights, **overrides)
        if not isinstance(config, SkinDualNetConfig):
            raise ValueError(f"--config {args.config} is a {type(config).__name__}, not a SkinDualNetConfig.")
        model = SkinDualNet(config)
        if args.backbone_pretrained:
            T.load_backbones(model)
        if segmenter is not None:
            model.segmenter.load_state_dict(segmenter.state_dict())
    model.segmenter.requires_grad_(False)
    del segmenter
    processor = SkinLesionImageProcessor.from_model_config(model.config)
    metadata = SkinLesionMetadataProcessor.from_config(model.config)
    logger.info(f"Labels {names}, class weights {None if weights is None else [round(w, 3) for w in weights]}")

    train_transform = SkinLesionTransform(processor, train=True, metadata_processor=metadata, seed=args.seed)
    eval_transform = SkinLesionTransform(processor, train=False, metadata_processor=metadata)
    run = T.prepare_run(
        accelerator,
        args,
        model,
        splits,
        train_transform,
        eval_transform,
        output_dir,
        checkpoints_dir,
        tracker="skin-dualnet-classifier",
    )
    model, state = run.model, run.state

    # Train, validate every epoch, keep the best ----------------------------------------------------------------------
    size = processor.size["height"], processor.size["width"]
    use_ground_truth = args.train_masks == "ground_truth"

    def blank_batch() -> dict[str, torch.Tensor]:
        device = accelerator.device
        return {
            "pixel_values": torch.zeros(1, 3, *size, device=device),
            "lesion_mask": torch.zeros(1, 1, *size, device=device),
            "has_mask": torch.ones(1, dtype=torch.bool, device=device),
            "labels": torch.zeros(1, dtype=torch.long, device=device),
            "age": torch.full((1,), float("nan"), device=device),
            "sex_ids": torch.zeros(1, dtype=torch.long, device=device),
            "site_ids": torch.zeros(1, dtype=torch.long, device=device),
        }

    def compute_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(
            pixel_values=batch["pixel_values"],
            age=batch["age"],
            sex_ids=batch["sex_ids"],
            site_ids=batch["site_ids"],
            lesion_mask=lesion_masks(model, batch, use_ground_truth, accelerator),
            labels=batch["labels"],
        ).loss

    T.train_loop(
        accelerator,
        args,
        run,
        train_transform,
        checkpoints_dir,
        timer,
        compute_loss=compute_loss,
        evaluate=lambda model: evaluate_classifier(
            model, run.eval_dataloader, accelerator, args.eval_masks == "ground_truth"
        ),
        blank_batch=blank_batch,
        best_key="balanced_accuracy",
        scores=SCORES,
    )

    # Save the best model (segmenter included), its processor, metrics and a model card -------------------------------
    accelerator.wait_for_everyone()
    T.load_best(accelerator, model, checkpoints_dir / "best_model")
    best = next((r for r in state.history if r["epoch"] == state.best_epoch), {})
    metrics = {
        "task": "classification",
        "best": {"metric": "balanced_accuracy", "value": state.best_metric, **best},
        "history": state.history,
        "split": split_summary,
        "bad_files": bad_files,
        "labels": names,
        "class_weights": weights,
        "steps": state.completed_steps,
        "num_processes": accelerator.num_processes,
        "wall_time_s": timer.elapsed(),
        "args": vars(args),
    }
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(output_dir, safe_serialization=True)
        processor.save_pretrained(output_dir)
        T.write_json(output_dir / "metrics.json", metrics)
        T.write_model_card(output_dir, "skin-dualnet classifier (segmenter included)", args, split_summary, best)
        logger.info(
            f"Saved the best model (epoch {state.best_epoch + 1}, balanced accuracy {state.best_metric:.4f}) "
            f"to {output_dir}"
        )
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
