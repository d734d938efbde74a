"""Helpers shared by `train_segmenter.py` and `train_classifier.py`: arguments, data, checkpoints, gathered
predictions and metrics. The training loops themselves live in the two scripts, readable top to bottom."""

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import datasets
import evaluate
import numpy as np
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
    load_clinic,
    load_ham10000,
    load_hub,
    load_isic2017,
    load_isic2018_task1,
    load_isic2019,
    validate_files,
)

logger = get_logger(__name__)

DATASETS = ("ham10000", "isic2017", "isic2018_task1", "isic2019", "clinic", "hub")
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class TrainingArguments:
    """Arguments shared by both training scripts."""

    config: str = field(
        metadata={
            "help": "Preset JSON (e.g. configuration/segmenter-tiny.json) or a saved model folder to start from."
        }
    )
    output_dir: str = field(metadata={"help": "Where the model, checkpoints and metrics.json are written."})
    dataset: list[str] = field(
        default_factory=list,
        metadata={"help": f"Data source(s), repeatable, paired in order with --data-root: {', '.join(DATASETS)}."},
    )
    data_root: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Root folder of each --dataset (a Hub dataset id for 'hub', the images folder for 'clinic')."
        },
    )
    clinic_csv: str | None = field(default=None, metadata={"help": "CSV of a 'clinic' dataset."})
    column_map: list[str] = field(
        default_factory=list,
        metadata={"help": "For 'clinic'/'hub': KEY=COLUMN pairs, e.g. image=file label=diagnosis age=age."},
    )
    hub_split: str = field(default="train", metadata={"help": "Split of a 'hub' dataset."})
    val_size: float = field(default=0.15, metadata={"help": "Share of the data (by lesion group) for validation."})
    test_size: float = field(default=0.0, metadata={"help": "Share held out as a test split (never trained on)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the grouped split (kept apart from --seed)."})
    holdout_splits: str | None = field(
        default=None,
        metadata={
            "help": "Another run's splits.json: its validation/test images (with their whole lesion groups) stay in "
            "this run's validation/test split, so e.g. the segmenter never trains on the classifier's test lesions."
        },
    )
    epochs: int = field(default=10, metadata={"help": "Training epochs."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps."})
    batch_size: int = field(default=16, metadata={"help": "Batch size per process."})
    eval_batch_size: int | None = field(default=None, metadata={"help": "Evaluation batch size (default: 2x)."})
    lr: float = field(default=3e-4, metadata={"help": "Peak learning rate (AdamW, cosine schedule with warmup)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of the steps used for linear warmup."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 = off)."})
    grad_accum: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="no", metadata={"help": "Accelerate precision."})
    backbone_pretrained: bool = field(
        default=False, metadata={"help": "Load ImageNet weights into the timm trunks first (needs the Hub)."}
    )
    checkpointing_steps: str = field(
        default="epoch", metadata={"help": "Save the training state every N steps, every 'epoch', or 'none'."}
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept (oldest removed first)."})
    resume: str | None = field(default=None, metadata={"help": "'latest' (in --output-dir) or a checkpoint folder."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training images (quick runs)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on validation images (quick runs)."})
    bad_files: Literal["skip", "raise", "unchecked"] = field(
        default="skip",
        metadata={"help": "Before training, open every file: skip bad ones with a report, raise, or do not check."},
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass: less memory, about a third more compute."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, shuffling and augmentation."})
    report_to: str = field(default="none", metadata={"help": "Accelerate trackers: none, all, tensorboard, wandb..."})
    cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is available."})
    log_samples: bool = field(
        default=False, metadata={"help": "Write the image ids each process trains on to output_dir/samples/."}
    )


def _argparse_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """argparse `type` and extra kwargs for a dataclass field annotation."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return type(args[0]), {"choices": list(args)}
    if origin in (list,):
        return args[0], {"nargs": "+", "action": "extend"}
    if args and type(None) in args:  # X | None
        inner = [a for a in args if a is not type(None)][0]
        return _argparse_type(inner)
    return annotation, {}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, the script's docstring (with its example commands) kept as written."""


def parse_arguments(cls: type, argv: list[str] | None = None, description: str | None = None) -> Any:
    """Build an argparse parser from a dataclass (help texts from field metadata) and parse `argv`.
    Fields `snake_case` become `--snake-case`; list fields are repeatable and take several values."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    for item in dataclasses.fields(cls):
        flag = "--" + item.name.replace("_", "-")
        help_text = item.metadata.get("help", "")
        required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        if item.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=item.default, help=help_text)
            continue
        kind, extra = _argparse_type(item.type)
        default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
        if required:
            parser.add_argument(flag, type=kind, required=True, help=help_text, **extra)
        else:
            parser.add_argument(
                flag, type=kind, default=None if extra.get("nargs") else default, help=help_text, **extra
            )
    namespace = vars(parser.parse_args(argv))
    for item in dataclasses.fields(cls):
        if namespace[item.name] is None and item.default_factory is not dataclasses.MISSING:
            namespace[item.name] = item.default_factory()
    args = cls(**namespace)
    check_arguments(args, parser)
    return args


def check_arguments(args: TrainingArguments, parser: argparse.ArgumentParser) -> None:
    if not args.dataset or len(args.dataset) != len(args.data_root):
        parser.error(
            f"give one --data-root per --dataset (got datasets {args.dataset} and roots {args.data_root}); "
            "e.g. --dataset ham10000 --data-root ../shared/data/ham10000"
        )
    unknown = [name for name in args.dataset if name not in DATASETS]
    if unknown:
        parser.error(f"unknown --dataset {unknown}; choose from {list(DATASETS)}")
    if "clinic" in args.dataset and not args.clinic_csv:
        parser.error("--dataset clinic needs --clinic-csv and --column-map image=COLUMN ...")
    for name, value in (
        ("--epochs", args.epochs),
        ("--batch-size", args.batch_size),
        ("--grad-accum", args.grad_accum),
    ):
        if value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.checkpointing_steps not in ("epoch", "none") and not args.checkpointing_steps.isdigit():
        parser.error(f"--checkpointing-steps must be a number, 'epoch' or 'none', got {args.checkpointing_steps!r}")
    if args.keep_checkpoints < 1:
        parser.error(f"--keep-checkpoints must be at least 1, got {args.keep_checkpoints}")
    for pair in args.column_map:
        if "=" not in pair:
            parser.error(f"--column-map entries must be KEY=COLUMN, got {pair!r}")


def build_accelerator(args: TrainingArguments, output_dir: Path) -> Accelerator:
    """The Accelerator of both scripts. A CPU-only machine launched with several processes (`torchrun
    --nproc_per_node N`, or `accelerate launch --multi_gpu --num_processes N`) gets the gloo backend: Accelerate
    only looks for CPU processes when told it runs on the CPU."""
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

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
    args: TrainingArguments, task: Literal["segmentation", "classification"], label_set: str = "ham10000"
):
    """Load and concatenate every --dataset. Segmentation keeps rows with masks and drops labels; classification
    keeps labelled rows (masks used when present)."""
    column_map = dict(pair.split("=", 1) for pair in args.column_map)
    masks = True if task == "segmentation" else "optional"
    parts = []
    for name, root in zip(args.dataset, args.data_root):
        if name == "ham10000":
            part = load_ham10000(root, masks=masks, labels=label_set)
        elif name == "isic2017":
            part = load_isic2017(root, masks=masks)
        elif name == "isic2018_task1":
            part = load_isic2018_task1(root)
        elif name == "isic2019":
            part = load_isic2019(root)
        elif name == "clinic":
            part = load_clinic(root, args.clinic_csv, column_map)
        else:
            part = load_hub(root, split=args.hub_split, column_map=column_map or None)
        logger.info(f"Loaded {len(part)} images from {name} ({root})")
        parts.append(part)
    dataset = concatenate_sources(parts, drop_labels=task == "segmentation")
    if task == "classification":
        labelled = [i for i, label in enumerate(column_values(dataset, "label")) if label >= 0]
        if len(labelled) < len(dataset):
            logger.info(f"Dropping {len(dataset) - len(labelled)} images without a label")
            dataset = dataset.select(labelled)
    if len(dataset) == 0:
        raise ValueError(f"No usable images in {args.dataset} at {args.data_root}.")
    return dataset


def prepare_splits(
    args: TrainingArguments, dataset: datasets.Dataset, stratify_column: str, require_masks: bool
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Grouped split → optional caps → file check of the splits used in training → split ids written to
    `output_dir/splits.json` (so evaluation can rebuild the held-out split)."""
    forced: dict[str, list[int]] = {"validation": [], "test": []}
    if getattr(args, "holdout_splits", None):
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
        rest,
        val_size=args.val_size,
        test_size=args.test_size,
        seed=args.split_seed,
        stratify_column=stratify_column,
    )
    for name, indices in forced.items():
        if indices:
            part = dataset.select(indices)
            splits[name] = datasets.concatenate_datasets([splits[name], part]) if name in splits else part
    if len(splits["validation"]) == 0:
        raise ValueError("The validation split is empty; raise --val-size or add data.")
    for name, cap in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if cap is not None and cap < len(splits[name]):
            splits[name] = splits[name].shuffle(seed=args.split_seed).select(range(cap))
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


def write_split_ids(path: Path, splits: datasets.DatasetDict, args: TrainingArguments) -> None:
    payload = {
        "dataset": args.dataset,
        "data_root": args.data_root,
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
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------
class TrainingState:
    """Progress saved with every checkpoint (`accelerator.register_for_checkpointing`)."""

    def __init__(self):
        self.completed_steps = 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.history: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "completed_steps": self.completed_steps,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": json.dumps(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.completed_steps = int(state["completed_steps"])
        self.best_metric = state["best_metric"]
        self.best_epoch = state["best_epoch"]
        self.history = json.loads(state["history"])


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (`checkpoint-<step>`), oldest first."""
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def find_checkpoint(resume: str | None, directory: Path) -> Path | None:
    """The checkpoint to resume from: `None` (fresh run), `"latest"` (newest in `directory`, or a fresh run when
    there is none yet) or an explicit folder."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(directory)
        if not checkpoints:
            logger.info(f"--resume latest: no checkpoint in {directory} yet, starting from scratch")
            return None
        return checkpoints[-1]
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"--resume {resume!r} is neither 'latest' nor a checkpoint folder.")
    return path


def save_checkpoint(accelerator: Accelerator, directory: Path, step: int, keep: int) -> Path:
    """`save_state` into a temporary folder renamed when complete (a run killed mid-save never leaves a partial
    `checkpoint-<step>`), then remove all but the `keep` newest."""
    final = directory / f"checkpoint-{step}"
    partial = directory / f".partial-checkpoint-{step}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


def unwrap_pretrained(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The `PreTrainedModel` inside a prepared model (or inside the cached-features wrapper of `--frozen-stages`)."""
    unwrapped = accelerator.unwrap_model(model)
    return getattr(unwrapped, "model", unwrapped) if not hasattr(unwrapped, "save_pretrained") else unwrapped


def save_best(accelerator: Accelerator, model: torch.nn.Module, directory: Path) -> None:
    if accelerator.is_main_process:
        unwrap_pretrained(accelerator, model).save_pretrained(directory, safe_serialization=True)
    accelerator.wait_for_everyone()


def load_best(accelerator: Accelerator, model: torch.nn.Module, directory: Path) -> bool:
    """Load the best weights saved by `save_best` into `model`; `False` when there are none."""
    path = directory / "model.safetensors"
    if not path.is_file():
        return False
    from safetensors.torch import load_file

    unwrapped = unwrap_pretrained(accelerator, model)
    missing, unexpected = unwrapped.load_state_dict(load_file(str(path)), strict=False)
    # Tied or non-persistent entries may be absent from the file; anything else is a real mismatch.
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise RuntimeError(f"Best model at {path} does not match: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    return True


# --------------------------------------------------------------------------------------------------------------------
# Gathered predictions and metrics
# --------------------------------------------------------------------------------------------------------------------
def broadcast_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Copy the main process's buffers (BatchNorm running statistics) to the others. DDP only does this at the start
    of each training forward, so after an epoch every process holds the statistics of its own last batch; evaluation
    must use the model the main process saves."""
    if accelerator.num_processes > 1:
        for buffer in accelerator.unwrap_model(model).buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def gather_by_index(accelerator: Accelerator, indices: list[torch.Tensor], *values: list[torch.Tensor]):
    """Gather per-process predictions keyed by dataset row index, drop the duplicates that even batching adds and
    sort by index. Returns numpy arrays `(indices, *values)` identical on every process."""
    device = accelerator.device
    local = [torch.cat(indices).to(device) if indices else torch.zeros(0, dtype=torch.long, device=device)]
    for chunks in values:
        local.append(torch.cat(chunks).to(device))
    padded = [accelerator.pad_across_processes(local[0], dim=0, pad_index=-1)]
    padded += [accelerator.pad_across_processes(tensor, dim=0) for tensor in local[1:]]
    gathered = [accelerator.gather(tensor).cpu().numpy() for tensor in padded]
    index = gathered[0]
    valid = index >= 0
    unique, first = np.unique(index[valid], return_index=True)
    return (unique, *[array[valid][first] for array in gathered[1:]])


_METRICS: dict[str, Any] = {}


def metric(name: str):
    """The shipped `evaluate` module `name` (loaded by path, so offline), loaded once per process."""
    if name not in _METRICS:
        from modeling_skinlesion.metrics import metric_path

        _METRICS[name] = evaluate.load(metric_path(name), keep_in_memory=True)
    return _METRICS[name]


def segmentation_metrics(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Per-image Dice, Jaccard, thresholded Jaccard, sensitivity, specificity, accuracy, macro-averaged."""
    return metric("lesion_segmentation").compute(predictions=list(predictions), references=list(references))


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro/per-class ROC AUC, per-class sensitivity/specificity, ECE."""
    probabilities = probabilities.astype(np.float64)
    probabilities /= probabilities.sum(axis=1, keepdims=True)  # float32 softmax rows can miss 1 by ~1e-7
    return metric("lesion_classification").compute(
        predictions=probabilities, references=labels.tolist(), label_names=names
    )


# --------------------------------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------------------------------
def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the negative log-likelihood of `softmax(logits / T)`
    on held-out `labels`, by L-BFGS on log T."""
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits_t / log_t.exp(), labels_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp().item())


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


def write_model_card(
    output_dir: Path, title: str, args: TrainingArguments, split: dict[str, Any], best: dict[str, Any]
) -> None:
    """A short model card: data, split, training settings and the best validation metrics."""
    scores = {k: round(v, 4) for k, v in best.get("validation", {}).items() if isinstance(v, (int, float))}
    lines = [
        f"# {title}",
        "",
        "Trained with skin-dualnet's training script. Research use only: not a medical device.",
        "",
        "## Training data",
        "",
        *[f"- `{name}` at `{root}`" for name, root in zip(args.dataset, args.data_root)],
        f"- Grouped split (by lesion), seed {args.split_seed}: "
        + ", ".join(f"{name} {entry['images']} images" for name, entry in split.items()),
        "",
        "HAM10000 and ISIC images are CC BY-NC 4.0: weights trained on them are for non-commercial use.",
        "",
        "## Training",
        "",
        f"- epochs {args.epochs}, max steps {args.max_steps}, batch size {args.batch_size} x {args.grad_accum} "
        f"accumulation, lr {args.lr}, seed {args.seed}, precision {args.mixed_precision}",
        "",
        "## Validation (best epoch)",
        "",
        f"- epoch {best.get('epoch')}: " + ", ".join(f"{k} {v}" for k, v in scores.items()),
        "",
    ]
    (output_dir / "README.md").write_text("\n".join(lines))


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
    output_dir: Path,
    checkpoints_dir: Path,
    tracker: str,
    dataloaders: tuple[Any, Any] | None = None,
) -> PreparedRun:
    """The part both training scripts share before their loops: data loaders, AdamW, `accelerator.prepare`, the
    cosine schedule, checkpoint registration, trackers (`--report-to`), resuming from `--resume`, the run summary in
    the log, the per-sample log and the progress bar. `dataloaders` (train, validation) replaces the image loaders
    with ready per-process ones (the cached features of `--frozen-stages`), which are not prepared again."""
    if args.gradient_checkpointing:
        pretrained = getattr(model, "model", model)  # the cached-features wrapper holds the PreTrainedModel
        if hasattr(pretrained, "activation_checkpointing_enable"):
            pretrained.activation_checkpointing_enable()
        else:
            pretrained.gradient_checkpointing_enable()
    if dataloaders is None:
        train_dataloader = build_dataloader(
            splits["train"],
            train_transform,
            args.batch_size,
            shuffle=True,
            num_workers=args.num_workers,
            seed=args.seed,
        )
        eval_dataloader = build_dataloader(
            splits["validation"],
            eval_transform,
            args.eval_batch_size or 2 * args.batch_size,
            num_workers=args.num_workers,
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
    train_transform: Any,
    checkpoints_dir: Path,
    timer: "Timer",
    *,
    compute_loss: Any,
    evaluate: Any,
    blank_batch: Any,
    best_key: str,
    scores: tuple[str, ...],
) -> None:
    """The epochs both training scripts run: accumulated, clipped AdamW steps with step checkpoints, then per epoch
    validation, best-model selection on `best_key`, a log line, tracker scalars and an end-of-epoch checkpoint.

    `compute_loss(model, batch)` returns the batch loss, `evaluate(model)` the validation metrics, and
    `blank_batch()` a one-image stand-in for a batch whose every image was unreadable (it runs with a zero loss
    weight, because the other processes still expect this one in the gradient all-reduce). Progress lives in
    `run.state` (history, best epoch, steps), which checkpoints carry, so a resumed run continues where it stopped.
    """
    model, state, progress = run.model, run.state, run.progress
    saved_step = state.completed_steps if run.checkpoint is not None else None
    for epoch in range(run.starting_epoch, run.epochs):
        if state.completed_steps >= run.max_steps:
            break
        model.train()
        train_transform.set_epoch(epoch)
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
