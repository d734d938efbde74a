"""Command-line arguments of the training, fine-tuning, evaluation and ablation scripts: `HfArgumentParser` over the
shared dataclasses below, so an option means the same thing, with the same default, in every script that takes it.

    ModelArguments       --backbone-pretrained (each training script adds its --config)
    DataArguments        --dataset/--data-root pairs and the options of the 'clinic' and 'hub' sources
    SplitArguments       the lesion-grouped split (--val-size, --test-size, --split-seed, ...) and the file check
    TrainingArguments    the optimisation, checkpointing and launch options of train_loop
    ClassifierArguments  the classifier's class weights and lesion masks (train_classifier.py, finetune.py)
    EvaluationArguments  batch size and device of the evaluation scripts
    FinetuneArguments    everything `finetuning.finetune` (and scripts/finetune.py) takes

Each script adds a dataclass of its own options and may change a shared default in a subclass (`with_default`), in
one visible place. This module imports only `transformers.HfArgumentParser` (about 1 s of CPU time; no torch,
datasets, timm or package code), so a script parses its arguments first and `--help` or a usage error answers at
once.
"""

import argparse
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from ..cli import HelpFormatter

# The --dataset names: the keys of `modeling_skinlesion.data.LOADERS` (not imported here: it needs `datasets`;
# `load_source` refuses a name it lacks, listing its keys). 'clinic' is a folder of images and a CSV, 'hub' a Hub
# dataset id.
DATASETS = ("ham10000", "isic2016_task1", "isic2017", "isic2018_task1", "isic2019", "ph2", "clinic", "hub")


class _DashedOptions:
    """Stands in for the parser (or group) `HfArgumentParser` adds a field to: keeps only the `--dash-case` spelling
    of an option (HfArgumentParser also adds `--snake_case`), and makes a bool field the switch `--flag/--no-flag`
    (HfArgumentParser writes `--flag [FLAG]` and adds its own `--no-flag` for a default of True)."""

    def __init__(self, parser: argparse._ActionsContainer):
        self.parser = parser

    def add_argument(self, *options: str, **kwargs: Any) -> None:
        if kwargs.get("action") == "store_false":  # HfArgumentParser's --no-flag: BooleanOptionalAction made it
            return
        dashed = [option for option in options if "_" not in option] or list(options)
        if kwargs.get("type") is string_to_bool:
            kwargs = {key: kwargs[key] for key in ("default", "help", "required") if key in kwargs}
            kwargs["action"] = argparse.BooleanOptionalAction
        self.parser.add_argument(*dashed, **kwargs)


class ArgumentParser(HfArgumentParser):
    """`HfArgumentParser` with this project's command line: `--dash-case` options, switches as `--flag/--no-flag`,
    option groups from each dataclass's `_argument_group_name` (inherited fields go to the group of the class that
    declares them), the docstring as written, and `check()` of every dataclass run after parsing."""

    def __init__(self, dataclass_type: type, description: str | None = None):
        super().__init__(dataclass_type, description=description, formatter_class=HelpFormatter)

    def _add_dataclass_arguments(self, dtype: type) -> None:
        # The script's own class first, then the shared ones in the order it lists them.
        owners = [cls for cls in dtype.__mro__ if dataclasses.is_dataclass(cls)]
        declared_by: dict[str, type] = {}
        for cls in reversed(owners):  # a field belongs to the first class that declares it, whoever redeclares it
            for name in cls.__dict__.get("__annotations__", {}):
                declared_by.setdefault(name, cls)
        groups: dict[str | None, Any] = {None: self}
        for cls in owners:
            fields = [item for item in dataclasses.fields(dtype) if declared_by[item.name] is cls]
            if not fields:
                continue
            title = cls.__dict__.get("_argument_group_name")
            if title not in groups:
                groups[title] = self.add_argument_group(title)
            container = _DashedOptions(groups[title])
            for item in fields:
                # HfArgumentParser narrows `field.type` in place; give it a copy.
                self._parse_dataclass_field(container, copy.copy(item))

    def parse(self, argv: list[str] | None = None) -> Any:
        """Parse `argv` (default: the command line) into the dataclass and check it; usage errors exit with code 2."""
        (args,) = self.parse_args_into_dataclasses(argv, look_for_args_file=False)
        for cls in reversed(type(args).__mro__):
            check = cls.__dict__.get("check")
            if check is not None:
                try:
                    check(args)
                except ValueError as error:
                    self.error(str(error))
        return args


CACHED_VIEWS_HELP = (
    "With the frozen-feature cache: augmented views of each training image to cache (epoch e uses view e mod N, "
    "with a random flip / quarter turn of the cached maps on top)."
)


def parse_arguments(dataclass_type: type, argv: list[str] | None = None, description: str | None = None) -> Any:
    """Parse `argv` into `dataclass_type` (see `ArgumentParser`)."""
    return ArgumentParser(dataclass_type, description=description).parse(argv)


def with_default(cls: type, name: str, default: Any) -> Any:
    """A field with the help of `cls.name` and another default: how a script sets its own default for a shared
    option (`lr: float = with_default(TrainingArguments, "lr", 1e-4)`)."""
    original = cls.__dataclass_fields__[name]
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=original.metadata)
    return field(default=default, metadata=original.metadata)


def check_pairs(option: str, pairs: list[str]) -> None:
    """A `ValueError` unless every entry of `option` is KEY=VALUE."""
    bad = [pair for pair in pairs if "=" not in pair]
    if bad:
        raise ValueError(f"{option} entries must be KEY=VALUE, got {bad}")


def _at_least(option: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{option} must be at least {minimum}, got {value}")


@dataclass(kw_only=True)
class ModelArguments:
    """What both training scripts start from; each adds its `config` option (with a preset of its own kind)."""

    _argument_group_name = "model"

    backbone_pretrained: bool = field(
        default=False, metadata={"help": "Load ImageNet weights into the timm trunks first (needs the Hub)."}
    )


@dataclass(kw_only=True)
class DataArguments:
    _argument_group_name = "data"

    dataset: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"Data source, repeatable, paired in order with --data-root: {', '.join(DATASETS)}.",
            "action": "extend",
        },
    )
    data_root: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Root folder of each --dataset (a Hub dataset id for 'hub', the images folder for 'clinic').",
            "action": "extend",
        },
    )
    clinic_csv: str | None = field(default=None, metadata={"help": "CSV of a 'clinic' dataset, one row per image."})
    column_map: list[str] = field(
        default_factory=list,
        metadata={
            "help": "KEY=COLUMN: the column of a clinic CSV (or Hub dataset) holding image, label, age, sex, site, "
            "group_id or mask, e.g. image=file label=diagnosis.",
            "action": "extend",
        },
    )
    hub_split: str = field(default="train", metadata={"help": "Split of a 'hub' dataset."})

    def check(self) -> None:
        if not self.dataset or len(self.dataset) != len(self.data_root):
            raise ValueError(
                f"give one --data-root per --dataset (got datasets {self.dataset} and roots {self.data_root}); "
                "e.g. --dataset ham10000 --data-root ../shared/data/ham10000"
            )
        if "clinic" in self.dataset and not self.clinic_csv:
            raise ValueError("--dataset clinic needs --clinic-csv and --column-map image=COLUMN ...")
        check_pairs("--column-map", self.column_map)


@dataclass(kw_only=True)
class SplitArguments:
    _argument_group_name = "split and file check"

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
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Cap on the validation (or evaluated) images, for quick runs."}
    )
    bad_files: Literal["skip", "raise", "unchecked"] = field(
        default="skip",
        metadata={"help": "Open every file first: skip unreadable ones with a report, raise, or do not check."},
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})

    def check(self) -> None:
        for option, value in (("--val-size", self.val_size), ("--test-size", self.test_size)):
            if not 0 <= value < 1:
                raise ValueError(f"{option} must lie in [0, 1), got {value}")
        _at_least("--max-eval-samples", self.max_eval_samples)


@dataclass(kw_only=True)
class TrainingArguments:
    _argument_group_name = "training"

    output_dir: str = field(metadata={"help": "Where the model, checkpoints, splits.json and metrics.json go."})
    epochs: int = field(default=10, metadata={"help": "Training epochs."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size per process."})
    eval_batch_size: int | None = field(
        default=None, metadata={"help": "Validation batch size per process (unset: twice --batch-size)."}
    )
    lr: float = field(default=3e-4, metadata={"help": "Peak learning rate (AdamW, cosine schedule with warmup)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of the steps used for linear warmup."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 = off)."})
    grad_accum: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="no", metadata={"help": "Accelerate precision."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass: less memory, about a third more compute."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training images (quick runs)."})
    checkpointing_steps: str = field(
        default="epoch", metadata={"help": "Save the training state every N steps, every 'epoch', or 'none'."}
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept (oldest removed first)."})
    resume: str | None = field(default=None, metadata={"help": "'latest' (in --output-dir) or a checkpoint folder."})
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, shuffling and augmentation."})
    report_to: str = field(default="none", metadata={"help": "Accelerate trackers: none, all, tensorboard, wandb..."})
    cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is available."})
    log_samples: bool = field(
        default=False, metadata={"help": "Write the image ids each process trains on to output_dir/samples/."}
    )

    def check(self) -> None:
        for option, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size)):
            _at_least(option, value)
        _at_least("--grad-accum", self.grad_accum)
        _at_least("--max-steps", self.max_steps)
        _at_least("--eval-batch-size", self.eval_batch_size)
        _at_least("--max-train-samples", self.max_train_samples)
        _at_least("--keep-checkpoints", self.keep_checkpoints)
        if self.checkpointing_steps not in ("epoch", "none") and not self.checkpointing_steps.isdigit():
            raise ValueError(
                f"--checkpointing-steps must be a number, 'epoch' or 'none', got {self.checkpointing_steps!r}"
            )


@dataclass(kw_only=True)
class ClassifierArguments:
    """The classifier's loss and lesion masks, shared by train_classifier.py and finetune.py."""

    _argument_group_name = "classifier"

    class_weights: Literal["balanced", "none"] = field(
        default="balanced", metadata={"help": "Cross-entropy class weights: n / (k * n_class) from the train split."}
    )
    train_masks: Literal["ground_truth", "predicted"] = field(
        default="ground_truth", metadata={"help": "Lesion masks while training, where the data has them."}
    )
    eval_masks: Literal["predicted", "ground_truth"] = field(
        default="predicted", metadata={"help": "Lesion masks for validation (predicted = as at inference)."}
    )


@dataclass(kw_only=True)
class EvaluationArguments:
    _argument_group_name = "evaluation"

    batch_size: int = field(default=16, metadata={"help": "Images per forward pass."})
    device: str | None = field(
        default=None, metadata={"help": "Torch device, e.g. cpu or cuda:1 (unset: the GPU when there is one)."}
    )

    def check(self) -> None:
        _at_least("--batch-size", self.batch_size)


@dataclass(kw_only=True)
class FinetuneArguments(ClassifierArguments, SplitArguments, TrainingArguments):
    """The options of `finetuning.finetune` and scripts/finetune.py. Fine-tuning starts from trained weights, so four
    defaults differ from train_classifier.py's: epochs 5, lr 1e-4, warmup ratio 0.1 and validation size 0.2."""

    _argument_group_name = "checkpoint and clinic data"

    checkpoint: str = field(metadata={"help": "Pretrained SkinDualNet: a saved folder or a Hub id."})
    images: str = field(metadata={"help": "The clinic's image folder."})
    csv: str = field(metadata={"help": "The clinic's CSV, one row per image."})
    # The training scripts' --column-map (KEY=COLUMN of the CSV); `check` requires image= and label= here.
    column_map: list[str] = with_default(DataArguments, "column_map", [])
    masks_dir: str | None = field(
        default=None, metadata={"help": "Folder the mask column is relative to (unset: --images)."}
    )
    source_name: str = field(default="clinic", metadata={"help": "Name of the clinic's data in the model card."})
    labels: list[str] = field(
        default_factory=list, metadata={"help": "The clinic's classes, in this order (unset: sorted names)."}
    )
    label_map: list[str] = field(
        default_factory=list,
        metadata={
            "help": "CLINIC_CLASS=CHECKPOINT_CLASS[,CHECKPOINT_CLASS...]: the checkpoint classes a clinic class "
            "stands for."
        },
    )
    site_map: list[str] = field(
        default_factory=list, metadata={"help": "CLINIC_VALUE=SITE synonyms for anatomical sites."}
    )
    sex_map: list[str] = field(default_factory=list, metadata={"help": "CLINIC_VALUE=SEX synonyms."})
    freeze_encoders: bool = field(
        default=False, metadata={"help": "Freeze both image encoders (weights and BatchNorm statistics)."}
    )
    cache_features: bool = field(
        default=True,
        metadata={
            "help": "With --freeze-encoders: compute the frozen part (segmenter masks, both trunks) once for "
            "--cached-views augmented views and train the rest on the cache (off: every step runs the images)."
        },
    )
    cached_views: int = field(default=3, metadata={"help": CACHED_VIEWS_HELP})
    working_size: int = field(
        default=2,
        metadata={
            "help": "Decode every clinic image once and keep a copy whose shorter side is this many times the "
            "model's input size (0 = read the original files every time); larger images are shrunk, smaller kept."
        },
    )
    recalibrate: bool = field(
        default=True,
        metadata={
            "help": "After training, refit on the clinic's split: temperature and logit bias (validation), the "
            "referral threshold (validation) and the out-of-distribution gate (train statistics, validation "
            "threshold). Off: the model is saved uncalibrated and the inherited gate / referral marked as such."
        },
    )
    malignant_labels: list[str] = field(
        default_factory=list,
        metadata={
            "help": "The clinic's malignant classes, for the referral point (unset: the classes named like one of "
            "the checkpoint's malignant classes or mapped only onto them)."
        },
    )
    referral_sensitivity: float = field(
        default=0.90,
        metadata={"help": "Sensitivity on the clinic's malignant validation cases of the referral point."},
    )
    ood_accept_rate: float = field(
        default=0.99, metadata={"help": "Share of the clinic's validation images the refitted gate accepts."}
    )

    # Fine-tuning's own defaults for shared options (their help is the shared one).
    epochs: int = with_default(TrainingArguments, "epochs", 5)
    lr: float = with_default(TrainingArguments, "lr", 1e-4)
    warmup_ratio: float = with_default(TrainingArguments, "warmup_ratio", 0.1)
    val_size: float = with_default(SplitArguments, "val_size", 0.2)

    def check(self) -> None:
        for option, pairs in (
            ("--column-map", self.column_map),
            ("--label-map", self.label_map),
            ("--site-map", self.site_map),
            ("--sex-map", self.sex_map),
        ):
            check_pairs(option, pairs)
        for key in ("image", "label"):
            if not any(pair.startswith(f"{key}=") for pair in self.column_map):
                raise ValueError(f"--column-map must map `{key}` to its CSV column, e.g. --column-map {key}=COLUMN")
        _at_least("--cached-views", self.cached_views)
        _at_least("--working-size", self.working_size, 0)
        if not 0 < self.referral_sensitivity < 1:
            raise ValueError(f"--referral-sensitivity must lie in (0, 1), got {self.referral_sensitivity}")
        if not 0.5 <= self.ood_accept_rate < 1:
            raise ValueError(f"--ood-accept-rate must lie in [0.5, 1), got {self.ood_accept_rate}")


__all__ = [
    "DATASETS",
    "ArgumentParser",
    "HelpFormatter",
    "ClassifierArguments",
    "DataArguments",
    "EvaluationArguments",
    "FinetuneArguments",
    "ModelArguments",
    "SplitArguments",
    "TrainingArguments",
    "check_pairs",
    "parse_arguments",
    "with_default",
]
