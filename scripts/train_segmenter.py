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
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    train_dataloader, eval_dataloader, state, samples, progress = (
        run.train_dataloader,
        run.eval_dataloader,
        run.state,
        run.samples,
        run.progress,
    )
    max_steps, epochs = run.max_steps, run.epochs
    checkpoint, starting_epoch, resume_batches = run.checkpoint, run.starting_epoch, run.resume_batches

    # Train -----------------------------------------------------------------------------------------------------------
    size = processor.size["height"], processor.size["width"]
    saved_step = state.completed_steps if checkpoint is not None else None
    for epoch in range(starting_epoch, epochs):
        if state.completed_steps >= max_steps:
            break
        model.train()
        train_transform.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == starting_epoch and resume_batches:
            batches = accelerator.skip_first_batches(train_dataloader, resume_batches)
        loss_sum, loss_count, dropped = torch.zeros((), device=accelerator.device), 0, 0
        for batch in batches:
            dropped += len(batch["dropped"])
            empty = batch["pixel_values"].shape[0] == 0
            if empty:
                # Every image of this batch was unreadable. Other processes still expect this one in the gradient
                # all-reduce, so it runs a blank image with a zero loss weight instead of skipping.
                batch = {
                    "pixel_values": torch.zeros(1, 3, *size, device=accelerator.device),
                    "lesion_mask": torch.zeros(1, 1, *size, device=accelerator.device),
                }
            samples.write(epoch, batch if not empty else {"image_id": []})
            with accelerator.accumulate(model):
                loss = model(pixel_values=batch["pixel_values"], labels=batch["lesion_mask"]).loss
                accelerator.backward(loss * (0.0 if empty else 1.0))
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not empty:
                loss_sum += loss.detach().float()
                loss_count += 1
            if accelerator.sync_gradients:
                state.completed_steps += 1
                progress.update(1)
                if args.checkpointing_steps.isdigit() and state.completed_steps % int(args.checkpointing_steps) == 0:
                    T.save_checkpoint(accelerator, checkpoints_dir, state.completed_steps, args.keep_checkpoints)
                    saved_step = state.completed_steps
                if state.completed_steps >= max_steps:
                    break

        # Validate, keep the best, log -------------------------------------------------------------------------------
        validation = evaluate_segmenter(model, eval_dataloader, accelerator)
        train_loss = accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean").item()
        improved = state.best_metric is None or validation["dice"] > state.best_metric
        if improved:
            state.best_metric, state.best_epoch = validation["dice"], epoch
            T.save_best(accelerator, model, checkpoints_dir / "best_model")
        record = {
            "epoch": epoch,
            "step": state.completed_steps,
            "train_loss": train_loss,
            "dropped_files": dropped,
            "validation": validation,
        }
        state.history.append(record)
        logger.info(
            f"epoch {epoch + 1}/{epochs} step {state.completed_steps} train_loss {train_loss:.4f} "
            f"{T.format_metrics(validation, SCORES)} | best dice {state.best_metric:.4f} "
            f"(epoch {state.best_epoch + 1}) | {timer.elapsed():.0f}s"
        )
        accelerator.log({"train_loss": train_loss, **{f"val_{k}": validation[k] for k in SCORES}}, step=epoch)
        # Every epoch; with step checkpoints, at the end of each epoch too unless that step was just saved.
        if args.checkpointing_steps != "none" and saved_step != state.completed_steps:
            T.save_checkpoint(accelerator, checkpoints_dir, state.completed_steps, args.keep_checkpoints)
            saved_step = state.completed_steps
    progress.close()

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
