"""The training run shared by `train_segmenter.py`, `train_classifier.py` and `finetune.py`, in the order a run
uses it: the Accelerator with logging and seed (`start_accelerator`), the data (`load_sources` through
`modeling_skinlesion.data.load_source`, the lesion-grouped split, the file check), the model helpers, `prepare_run`
(loaders, AdamW, schedule, `accelerator.prepare`, resume) and `train_loop`, the one epoch loop of all three scripts,
then what a run writes (`run_record` for metrics.json, `save_run` with the model card of
`modeling_skinlesion.model_card`). Each script keeps its arguments, model, loss and validation in its own `main()`,
readable top to bottom. Checkpoints are in `checkpoints.py`, evaluation in `evaluation.py`, the command-line
options in `arguments.py`."""

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from modeling_skinlesion.data import (
    build_dataloader,
    check_no_group_leak,
    class_counts,
    column_values,
    concatenate_sources,
    grouped_split,
    label_names,
    load_source,
    validate_files,
)

from .arguments import DataArguments, SplitArguments, TrainingArguments
from .checkpoints import TrainingState, find_checkpoint, load_best, save_best, save_checkpoint

logger = get_logger(__name__)


def start_accelerator(args: TrainingArguments, output_dir: Path) -> Accelerator:
    """The Accelerator of a training run, with logging set up (`setup_logging`), the seed set and
    `output_dir/checkpoints` made. A CPU-only machine launched with several processes (`torchrun --nproc_per_node N`,
    or `accelerate launch --multi_gpu --num_processes N`) gets the gloo backend: Accelerate only looks for CPU
    processes when told it runs on the CPU."""
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        cpu=args.cpu or (world_size > 1 and not torch.cuda.is_available()),
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
        # The sampler is re-seeded from (seed, epoch): every process, and a resumed run, sees the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"Launched with WORLD_SIZE={world_size} but Accelerate set up {accelerator.num_processes} process(es); "
            "every process would train on all the data."
        )
    setup_logging(accelerator)
    logger.info(accelerator.state, main_process_only=True)
    set_seed(args.seed)
    if accelerator.is_main_process:
        (output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return accelerator


def setup_logging(accelerator: Accelerator) -> None:
    """INFO on the main process, errors only elsewhere (as the transformers `no_trainer` scripts)."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if accelerator.is_main_process else logging.ERROR,
        stream=sys.stdout,
    )
    logging.getLogger("modeling_skinlesion.data").setLevel(logging.WARNING)
    for name in ("accelerate.checkpointing", "accelerate.accelerator"):  # one line per file saved otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if not accelerator.is_main_process:
        import transformers

        transformers.utils.logging.set_verbosity_error()


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------
def load_sources(
    args: DataArguments, task: Literal["segmentation", "classification"], label_set: str = "ham10000"
) -> datasets.Dataset:
    """Load every --dataset through `modeling_skinlesion.data.load_source` and concatenate them. The official layouts
    get the masks and the label set the task asks for; 'clinic' its CSV and column map, 'hub' its split and column map.
    Segmentation keeps rows with masks and drops labels; classification keeps labelled rows (masks used when
    present)."""
    column_map = dict(pair.split("=", 1) for pair in args.column_map)
    options = {
        "clinic": {"csv_path": args.clinic_csv, "column_map": column_map},
        "hub": {"split": args.hub_split, "column_map": column_map or None},
    }
    official = {"masks": True if task == "segmentation" else "optional", "labels": label_set}
    parts = []
    for name, root in zip(args.dataset, args.data_root):
        part = load_source(name, root, **options.get(name, official))
        logger.info(f"Loaded {len(part)} images from {name} ({root})")
        parts.append(part)
    dataset = concatenate_sources(parts, drop_labels=task == "segmentation")
    if task == "classification":
        dataset = keep_labelled(dataset)
    if len(dataset) == 0:
        raise ValueError(f"No usable images in {args.dataset} at {args.data_root}.")
    return dataset


def keep_labelled(dataset: datasets.Dataset) -> datasets.Dataset:
    """The rows of `dataset` that have a label (the others are logged and dropped)."""
    labelled = [i for i, label in enumerate(column_values(dataset, "label")) if label >= 0]
    if len(labelled) < len(dataset):
        logger.info(f"Dropping {len(dataset) - len(labelled)} images without a label")
        dataset = dataset.select(labelled)
    return dataset


def split_dataset(args: SplitArguments, dataset: datasets.Dataset, stratify_column: str) -> datasets.DatasetDict:
    """The lesion-grouped split of `dataset` (`grouped_split` with --val-size, --test-size, --split-seed), with the
    validation/test lesions of --holdout-splits kept in validation/test. Training and evaluation both split here."""
    forced: dict[str, list[int]] = {"validation": [], "test": []}
    if args.holdout_splits:
        recorded = json.loads(Path(args.holdout_splits).read_text())
        where = {image_id: name for name in forced for image_id in recorded.get(name, [])}
        groups = column_values(dataset, "group_id")
        group_split = {groups[i]: where[image_id] for i, image_id in enumerate(column_values(dataset, "image_id"))
                       if image_id in where}  # fmt: skip
        for index, group in enumerate(groups):
            if group in group_split:
                forced[group_split[group]].append(index)
        logger.info(
            f"--holdout-splits {args.holdout_splits}: {len(forced['validation'])} validation and "
            f"{len(forced['test'])} test images kept out of training"
        )
    held = set(forced["validation"]) | set(forced["test"])
    rest = dataset.select([i for i in range(len(dataset)) if i not in held]) if held else dataset
    splits = grouped_split(
        rest, val_size=args.val_size, test_size=args.test_size, seed=args.split_seed, stratify_column=stratify_column
    )
    for name, indices in forced.items():
        if indices:
            part = dataset.select(indices)
            splits[name] = datasets.concatenate_datasets([splits[name], part]) if name in splits else part
    return splits


def cap(split: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    """At most `limit` rows of `split`, drawn with `seed` (--max-train-samples, --max-eval-samples)."""
    return split.shuffle(seed=seed).select(range(limit)) if limit is not None and limit < len(split) else split


def prepare_splits(
    args: Any, dataset: datasets.Dataset, stratify_column: str, require_masks: bool
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """`split_dataset` → the --max-train-samples / --max-eval-samples caps → file check of the train and validation
    splits (`args` holds the split and training options). Returns the splits and the file-check report."""
    splits = split_dataset(args, dataset, stratify_column)
    if len(splits["validation"]) == 0:
        raise ValueError("The validation split is empty; raise --val-size or add data.")
    splits["train"] = cap(splits["train"], args.max_train_samples, args.split_seed)
    splits["validation"] = cap(splits["validation"], args.max_eval_samples, args.split_seed)
    report: dict[str, Any] = {}
    if args.bad_files != "unchecked":
        for name in ("train", "validation"):
            splits[name], summary = validate_files(
                splits[name], on_error=args.bad_files, check_masks=True, require_masks=require_masks
            )
            report[name] = summary.to_dict()
            logger.info(f"{name}: {summary}".splitlines()[0])
    check_no_group_leak(splits)
    return splits, report


def write_split_ids(
    path: Path, splits: datasets.DatasetDict, args: SplitArguments, dataset: list[str], data_root: list[str]
) -> None:
    """`splits.json`: the image ids of each split and how they were drawn, for evaluation and --holdout-splits."""
    payload = {
        "dataset": dataset,
        "data_root": data_root,
        "val_size": args.val_size,
        "test_size": args.test_size,
        "split_seed": args.split_seed,
        **{name: column_values(split, "image_id") for name, split in splits.items()},
    }
    path.write_text(json.dumps(payload, indent=1))


def describe_split(splits: datasets.DatasetDict) -> dict[str, Any]:
    described = {}
    for name, split in splits.items():
        entry: dict[str, Any] = {"images": len(split), "groups": len(set(column_values(split, "group_id")))}
        if set(column_values(split, "label")) != {-1}:
            entry["class_counts"] = dict(zip(label_names(split), class_counts(split)))
        described[name] = entry
    return described


# --------------------------------------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------------------------------------
def is_model_folder(path: str) -> bool:
    return Path(path).is_dir() and any(
        (Path(path) / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")
    )


def load_backbones(model: torch.nn.Module) -> None:
    """ImageNet weights into every timm trunk, or a clear error when the Hub cannot be reached."""
    try:
        model.load_pretrained_backbones()
    except Exception as error:  # timm/huggingface_hub raise many kinds of errors offline
        raise RuntimeError(
            f"--backbone-pretrained could not download the ImageNet weights of {model.config.encoder_name!r} "
            f"({type(error).__name__}: {error}). It needs access to the Hugging Face Hub (unset HF_HUB_OFFLINE); "
            "offline, train without --backbone-pretrained."
        ) from error


def build_optimizer(model: torch.nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and normalisation weights; frozen parameters are left out."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim <= 1 or name.endswith(".bias") else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr)


def training_schedule(num_batches: int, args: TrainingArguments) -> tuple[int, int, int]:
    """(update steps per epoch, total update steps, epochs) from the per-process batch count."""
    steps_per_epoch = math.ceil(num_batches / args.grad_accum)
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    return steps_per_epoch, max_steps, epochs


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------------------------------
class SampleLog:
    """With --log-samples, one line `epoch<TAB>index<TAB>image_id` per training image, one file per process."""

    def __init__(self, output_dir: Path, process_index: int, enabled: bool):
        self.path = output_dir / "samples" / f"rank{process_index}.tsv" if enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, epoch: int, batch: dict[str, Any]) -> None:
        if self.path is None or not batch["image_id"]:
            return
        with self.path.open("a") as handle:
            for index, image_id in zip(batch["index"].tolist(), batch["image_id"]):
                handle.write(f"{epoch}\t{index}\t{image_id}\n")


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str))


def format_metrics(metrics: dict[str, Any], keys: tuple[str, ...]) -> str:
    return " ".join(f"{key} {metrics[key]:.4f}" for key in keys if isinstance(metrics.get(key), (int, float)))


def run_record(accelerator: Accelerator, args: Any, state: "TrainingState", timer: "Timer", **entries: Any) -> dict:
    """The metrics.json of a training run: the best epoch (by `train_loop`'s `best_key`) and its validation scores,
    every epoch's record, the steps, processes, wall time and arguments, and the script's own `entries` (split, file
    check, ...)."""
    best = next((record for record in state.history if record["epoch"] == state.best_epoch), {})
    return {
        "best": {"metric": state.best_key, "value": state.best_metric, **best},
        "history": state.history,
        **entries,
        "steps": state.completed_steps,
        "num_processes": accelerator.num_processes,
        "wall_time_s": timer.elapsed(),
        "args": vars(args),
    }


def training_facts(args: Any, metrics: dict[str, Any]) -> dict[str, str]:
    """The run's split, schedule and wall time, for the "Training data" list of the model card."""
    split = ", ".join(f"{name} {entry['images']} images" for name, entry in metrics["split"].items())
    epochs = sum(record["epoch"] >= 0 for record in metrics["history"])  # not the starting model's "epoch 0"
    return {
        "split": f"lesion-grouped, seed {args.split_seed}: {split}",
        "schedule": f"{epochs} epochs, {metrics['steps']} steps of batch {args.batch_size} x "
        f"{metrics['num_processes']} process(es) x {args.grad_accum} accumulation, lr {args.lr}, seed {args.seed}, "
        f"precision {args.mixed_precision}",
        "wall time": f"{metrics['wall_time_s'] / 60:.1f} min",
    }


def save_run(
    accelerator: Accelerator, output_dir: Path, model: Any, processor: Any, metrics: dict[str, Any], **card: Any
) -> None:
    """On the main process: the model (safetensors), its image processor, metrics.json and the model card
    (`modeling_skinlesion.model_card.write_model_card` with the `card` keywords) in `output_dir`."""
    from modeling_skinlesion.model_card import training_datasets, write_model_card

    card.setdefault("datasets", training_datasets(metrics))
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if getattr(model.config, "model_type", None) == "skin_dualnet":
            # Hub-ready: with the pipeline's code too, so `pipeline("skin-lesion-analysis", model=output_dir,
            # trust_remote_code=True)` works on the saved folder as on the shipped checkpoint.
            from modeling_skinlesion.pipeline_skinlesion import save_for_hub

            save_for_hub(model, output_dir, processor)
        else:
            model.save_pretrained(output_dir, safe_serialization=True)
            processor.save_pretrained(output_dir)
        write_json(output_dir / "metrics.json", metrics)
        write_model_card(output_dir, model.config, metrics=metrics, **card)
    accelerator.wait_for_everyone()


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class PreparedRun:
    """What `prepare_run` hands back: the prepared objects, the schedule, and where a resumed run starts."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_dataloader: Any
    eval_dataloader: Any
    train_transform: Any
    checkpoints_dir: Path
    state: "TrainingState"
    max_steps: int
    epochs: int
    checkpoint: Path | None
    starting_epoch: int
    resume_batches: int
    samples: "SampleLog"
    progress: Any


def prepare_run(
    accelerator: Accelerator,
    args: TrainingArguments,
    model: torch.nn.Module,
    splits: datasets.DatasetDict,
    train_transform: Any,
    eval_transform: Any,
    tracker: str,
    dataloaders: tuple[Any, Any] | None = None,
) -> PreparedRun:
    """What the three training scripts share before their loop: data loaders, AdamW, `accelerator.prepare`, the
    cosine schedule, checkpoint registration, trackers (`--report-to`), resuming from `--resume`, the run summary in
    the log, the per-sample log and the progress bar. `dataloaders` (train, validation) replaces the image loaders
    with ready per-process ones (the cached features of `--frozen-stages`), which are not prepared again."""
    output_dir = Path(args.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    if args.gradient_checkpointing:
        pretrained = getattr(model, "model", model)  # the cached-features wrapper holds the PreTrainedModel
        if hasattr(pretrained, "activation_checkpointing_enable"):
            pretrained.activation_checkpointing_enable()
        else:
            pretrained.gradient_checkpointing_enable()
    if dataloaders is None:
        train_dataloader = build_dataloader(
            splits["train"], train_transform, args.batch_size, True, num_workers=args.num_workers, seed=args.seed
        )
        eval_batch_size = args.eval_batch_size or 2 * args.batch_size
        eval_dataloader = build_dataloader(
            splits["validation"], eval_transform, eval_batch_size, num_workers=args.num_workers
        )
        optimizer = build_optimizer(model, args)
        model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
            model, optimizer, train_dataloader, eval_dataloader
        )
    else:
        train_dataloader, eval_dataloader = dataloaders
        optimizer = build_optimizer(model, args)
        model, optimizer = accelerator.prepare(model, optimizer)
    steps_per_epoch, max_steps, epochs = training_schedule(len(train_dataloader), args)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer,
        num_warmup_steps=int(args.warmup_ratio * max_steps) * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    scheduler = accelerator.prepare(scheduler)
    state = TrainingState()
    accelerator.register_for_checkpointing(state)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(tracker, config={k: str(v) for k, v in vars(args).items()})

    checkpoint = find_checkpoint(args.resume, checkpoints_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        logger.info(f"Resumed from {checkpoint} at step {state.completed_steps}")
    logger.info(
        f"{len(splits['train'])} training images, {accelerator.num_processes} process(es) x batch {args.batch_size} x "
        f"{args.grad_accum} accumulation: {steps_per_epoch} steps/epoch, {max_steps} steps, {epochs} epochs"
    )
    return PreparedRun(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_dataloader=train_dataloader,
        eval_dataloader=eval_dataloader,
        train_transform=train_transform,
        checkpoints_dir=checkpoints_dir,
        state=state,
        max_steps=max_steps,
        epochs=epochs,
        checkpoint=checkpoint,
        starting_epoch=state.completed_steps // steps_per_epoch,
        resume_batches=(state.completed_steps % steps_per_epoch) * args.grad_accum,
        samples=SampleLog(output_dir, accelerator.process_index, args.log_samples),
        progress=tqdm(
            total=max_steps, initial=state.completed_steps, disable=not accelerator.is_local_main_process, desc="train"
        ),
    )


def train_loop(
    accelerator: Accelerator,
    args: TrainingArguments,
    run: PreparedRun,
    timer: "Timer",
    *,
    compute_loss: Any,
    evaluate: Any,
    blank_batch: Any,
    best_key: str,
    scores: tuple[str, ...],
    frozen: tuple[torch.nn.Module, ...] = (),
    baseline: bool = False,
) -> None:
    """The epochs of the three training scripts: accumulated, clipped AdamW steps with step checkpoints, then per epoch
    validation, best-model selection on `best_key`, a log line, tracker scalars and an end-of-epoch checkpoint.

    `compute_loss(model, batch)` returns the batch loss, `evaluate(model)` the validation metrics, and
    `blank_batch()` a one-image stand-in for a batch whose every image was unreadable (it runs with a zero loss
    weight, because the other processes still expect this one in the gradient all-reduce). The `frozen` modules stay
    in eval mode while the rest trains (their BatchNorm statistics stay as loaded). The loop ends with the best
    epoch's weights loaded back into `run.model`. Progress lives in
    `run.state` (history, best epoch, steps), which checkpoints carry, so a resumed run continues where it stopped.

    With `baseline` (fine-tuning), the model as it starts is validated first and counts as "epoch 0" of the model
    selection (recorded with `"epoch": -1`): an epoch is kept only if it beats the starting model, otherwise the
    starting weights come back.
    """
    model, state, progress, checkpoints_dir = run.model, run.state, run.progress, run.checkpoints_dir
    state.best_key = best_key
    saved_step = state.completed_steps if run.checkpoint is not None else None
    if baseline and run.checkpoint is None and not state.history:
        validation = evaluate(model)
        state.best_metric, state.best_epoch = validation[best_key], -1
        save_best(accelerator, model, checkpoints_dir / "best_model")
        state.history.append(
            {"epoch": -1, "step": 0, "train_loss": None, "dropped_files": 0, "validation": validation}
        )
        logger.info(f"epoch 0 (the starting model) {format_metrics(validation, scores)} | {timer.elapsed():.0f}s")
    for epoch in range(run.starting_epoch, run.epochs):
        if state.completed_steps >= run.max_steps:
            break
        model.train()
        for module in frozen:
            module.eval()
        run.train_transform.set_epoch(epoch)
        run.train_dataloader.set_epoch(epoch)
        batches = run.train_dataloader
        if epoch == run.starting_epoch and run.resume_batches:
            batches = accelerator.skip_first_batches(run.train_dataloader, run.resume_batches)
        loss_sum, loss_count, dropped = torch.zeros((), device=accelerator.device), 0, 0
        for batch in batches:
            dropped += len(batch["dropped"])
            empty = len(batch["image_id"]) == 0
            if empty:
                batch = blank_batch()
            run.samples.write(epoch, batch if not empty else {"image_id": []})
            with accelerator.accumulate(model):
                loss = compute_loss(model, batch)
                accelerator.backward(loss * (0.0 if empty else 1.0))
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad()
            if not empty:
                loss_sum += loss.detach().float()
                loss_count += 1
            if accelerator.sync_gradients:
                state.completed_steps += 1
                progress.update(1)
                if args.checkpointing_steps.isdigit() and state.completed_steps % int(args.checkpointing_steps) == 0:
                    save_checkpoint(accelerator, checkpoints_dir, state.completed_steps, args.keep_checkpoints)
                    saved_step = state.completed_steps
                if state.completed_steps >= run.max_steps:
                    break

        validation = evaluate(model)
        train_loss = accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean").item()
        if state.best_metric is None or validation[best_key] > state.best_metric:
            state.best_metric, state.best_epoch = validation[best_key], epoch
            save_best(accelerator, model, checkpoints_dir / "best_model")
        state.history.append(
            {
                "epoch": epoch,
                "step": state.completed_steps,
                "train_loss": train_loss,
                "dropped_files": dropped,
                "validation": validation,
            }
        )
        logger.info(
            f"epoch {epoch + 1}/{run.epochs} step {state.completed_steps} train_loss {train_loss:.4f} "
            f"{format_metrics(validation, scores)} | best {best_key} {state.best_metric:.4f} "
            f"(epoch {state.best_epoch + 1}) | {timer.elapsed():.0f}s"
        )
        scalars = {f"val_{k}": validation[k] for k in scores if isinstance(validation.get(k), float)}
        accelerator.log({"train_loss": train_loss, **scalars}, step=epoch)
        # Every epoch; with step checkpoints, at the end of each epoch too unless that step was just saved.
        if args.checkpointing_steps != "none" and saved_step != state.completed_steps:
            save_checkpoint(accelerator, checkpoints_dir, state.completed_steps, args.keep_checkpoints)
            saved_step = state.completed_steps
    progress.close()
    accelerator.wait_for_everyone()
    load_best(accelerator, model, checkpoints_dir / "best_model")
