"""Train the skin-dualnet lesion segmenter (Deep-UNet) with Accelerate.

    accelerate launch scripts/train_segmenter.py \
        --config configuration/segmenter.json \
        --dataset ham10000 --data-root ../shared/data/ham10000 \
        --dataset isic2017 --data-root ../shared/data/isic2017 \
        --output-dir runs/segmenter --epochs 30 --batch-size 16 --mixed-precision bf16

Plain `python scripts/train_segmenter.py ...` runs on one device. Several processes (data parallel; --batch-size
is per process):

    accelerate launch --multi_gpu --num_processes 4 scripts/train_segmenter.py ...        # 4 GPUs
    accelerate launch --multi_gpu --num_machines 2 --machine_rank 0 --num_processes 16 \
        --main_process_ip HOST0 --main_process_port 29500 scripts/train_segmenter.py ...  # 2 nodes x 8 GPUs
    torchrun --nproc_per_node 2 scripts/train_segmenter.py ...                            # 2 CPU processes (gloo)
 Each epoch ends with a validation pass scored by
the shipped `lesion_segmentation` metric (Dice, Jaccard, ...); the epoch with the best Dice is kept and saved with
its image processor in --output-dir, next to metrics.json, splits.json and a model card. `--resume latest` continues
an interrupted run from its newest checkpoint.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _training as T  # noqa: E402

from modeling_skinlesion import SkinLesionImageProcessor, SkinLesionSegmenter, SkinLesionSegmenterConfig  # noqa: E402
from modeling_skinlesion.data import SkinLesionTransform  # noqa: E402

logger = get_logger(__name__)
SCORES = ("dice", "jaccard", "thresholded_jaccard", "sensitivity", "specificity")


@dataclass
class SegmenterArguments(T.TrainingArguments):
    """All options are shared with train_classifier.py; the segmenter has no others."""


@torch.no_grad()
def evaluate_segmenter(model, dataloader, accelerator: Accelerator) -> dict[str, float]:
    """Validation Dice & co. over the whole (sharded) dataloader, gathered across processes, each image once.
    Masks are compared at the model's input size, thresholded at the config's `mask_threshold`."""
    T.broadcast_buffers(accelerator, model)
    model = accelerator.unwrap_model(model)  # no DDP collectives inside forward: processes may have empty batches
    model.eval()
    threshold = model.config.mask_threshold
    indices, predictions, references = [], [], []
    for batch in dataloader:
        if batch["pixel_values"].shape[0] == 0:
            continue
        logits = model(pixel_values=batch["pixel_values"]).logits
        indices.append(batch["index"])
        predictions.append((logits.float().sigmoid() > threshold)[:, 0].to(torch.uint8))
        references.append((batch["lesion_mask"] > 0.5)[:, 0].to(torch.uint8))
    size = model.config.image_size
    if not indices:
        predictions = references = [torch.zeros(0, size, size, dtype=torch.uint8, device=accelerator.device)]
    _, predicted, reference = T.gather_by_index(accelerator, indices, predictions, references)
    return T.segmentation_metrics(predicted.astype(bool), reference.astype(bool))


def main(argv: list[str] | None = None) -> dict:
    args = T.parse_arguments(SegmenterArguments, argv, description=__doc__)
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

    # Data: every source with masks, grouped split stratified by source, file check ---------------------------------
    with accelerator.main_process_first():
        dataset = T.load_sources(args, "segmentation")
        splits, bad_files = T.prepare_splits(args, dataset, stratify_column="source", require_masks=True)
    split_summary = T.describe_split(splits)
    logger.info(f"Split: {split_summary}")
    if accelerator.is_main_process:
        T.write_split_ids(output_dir / "splits.json", splits, args)

    # Model ----------------------------------------------------------------------------------------------------------
    if T.is_model_folder(args.config):
        model = SkinLesionSegmenter.from_pretrained(args.config)
    else:
        config = AutoConfig.from_pretrained(args.config)
        if not isinstance(config, SkinLesionSegmenterConfig):
            raise ValueError(f"--config {args.config} is a {type(config).__name__}, not a segmenter configuration.")
        model = SkinLesionSegmenter(config)
    if args.backbone_pretrained:
        T.load_backbones(model)
    processor = SkinLesionImageProcessor.from_model_config(model.config)

    train_transform = SkinLesionTransform(processor, train=True, seed=args.seed)
    eval_transform = SkinLesionTransform(processor, train=False)
    run = T.prepare_run(
        accelerator,
        args,
        model,
        splits,
        train_transform,
        eval_transform,
        output_dir,
        checkpoints_dir,
        tracker="skin-dualnet-segmenter",
    )
    model, state = run.model, run.state

    # Train, validate every epoch, keep the best ----------------------------------------------------------------------
    size = processor.size["height"], processor.size["width"]

    def blank_batch() -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.zeros(1, 3, *size, device=accelerator.device),
            "lesion_mask": torch.zeros(1, 1, *size, device=accelerator.device),
        }

    T.train_loop(
        accelerator,
        args,
        run,
        train_transform,
        checkpoints_dir,
        timer,
        compute_loss=lambda model, batch: model(pixel_values=batch["pixel_values"], labels=batch["lesion_mask"]).loss,
        evaluate=lambda model: evaluate_segmenter(model, run.eval_dataloader, accelerator),
        blank_batch=blank_batch,
        best_key="dice",
        scores=SCORES,
    )

    # Save the best model, its processor, metrics and a model card ---------------------------------------------------
    accelerator.wait_for_everyone()
    T.load_best(accelerator, model, checkpoints_dir / "best_model")
    best = next((r for r in state.history if r["epoch"] == state.best_epoch), {})
    metrics = {
        "task": "segmentation",
        "best": {"metric": "dice", "value": state.best_metric, **best},
        "history": state.history,
        "split": split_summary,
        "bad_files": bad_files,
        "steps": state.completed_steps,
        "num_processes": accelerator.num_processes,
        "wall_time_s": timer.elapsed(),
        "args": vars(args),
    }
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(output_dir, safe_serialization=True)
        processor.save_pretrained(output_dir)
        T.write_json(output_dir / "metrics.json", metrics)
        T.write_model_card(output_dir, "skin-dualnet lesion segmenter", args, split_summary, best)
        logger.info(
            f"Saved the best model (epoch {state.best_epoch + 1}, dice {state.best_metric:.4f}) to {output_dir}"
        )
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
