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

import _feature_cache as FC  # noqa: E402
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
    build_dataloader,
    class_counts,
    column_values,
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
    logit_adjustment: float = field(
        default=0.0,
        metadata={
            "help": "Logit-adjusted loss: add TAU * log(train class prior) to the logits inside the loss (0 = off; 1 "
            "is the usual value). Learns the rare classes without class weights; use with --class-weights none."
        },
    )
    frozen_stages: int = field(
        default=0,
        metadata={
            "help": "Freeze the stem and the first K stages of both trunks and train on their cached outputs "
            "(EfficientNet-family trunks; 0 = train end to end). Makes CPU epochs several times cheaper."
        },
    )
    cached_views: int = field(
        default=2, metadata={"help": "With --frozen-stages: augmented views of each training image to cache."}
    )
    tune_logit_bias: bool = field(
        default=False,
        metadata={
            "help": "Before the temperature, fit a post-hoc logit adjustment -TAU * log(train class prior) on the "
            "validation split (TAU on a grid, best validation balanced accuracy) and store it as config.logit_bias."
        },
    )
    calibrate: bool = field(
        default=True,
        metadata={"help": "Fit a temperature on the validation split after training and store it in the config."},
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


def image_forward(model, batch: dict, use_ground_truth: bool, accelerator: Accelerator, labels: bool = False):
    """The classifier on a batch of images (masks as `lesion_masks` decides)."""
    return model(
        pixel_values=batch["pixel_values"],
        age=batch["age"],
        sex_ids=batch["sex_ids"],
        site_ids=batch["site_ids"],
        lesion_mask=lesion_masks(model, batch, use_ground_truth, accelerator),
        labels=batch["labels"] if labels else None,
    )


def feature_forward(model, batch: dict, labels: bool = False):
    """The classifier on a batch of cached frozen-trunk features (`--frozen-stages`)."""
    return model(
        image_features=batch["image_features"],
        lesion_features=batch.get("lesion_features"),
        age=batch["age"],
        sex_ids=batch["sex_ids"],
        site_ids=batch["site_ids"],
        labels=batch["labels"] if labels else None,
    )


@torch.no_grad()
def predict_logits(model, dataloader, accelerator: Accelerator, forward) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over the whole (sharded) dataloader, gathered across processes, each image once.
    `forward(model, batch)` runs the model. Call `T.broadcast_buffers` first on a model that was trained with DDP."""
    model = accelerator.unwrap_model(model)  # no DDP collectives inside forward: processes may have empty batches
    model.eval()
    indices, logits, labels = [], [], []
    for batch in dataloader:
        if len(batch["image_id"]) == 0:
            continue
        logits.append(forward(model, batch).logits.float())
        indices.append(batch["index"])
        labels.append(batch["labels"])
    if not indices:
        num_labels = T.unwrap_pretrained(accelerator, model).config.num_labels
        logits = [torch.zeros(0, num_labels, device=accelerator.device)]
        labels = [torch.zeros(0, dtype=torch.long, device=accelerator.device)]
    _, logit, label = T.gather_by_index(accelerator, indices, logits, labels)
    return logit, label


def predict_probabilities(
    model, dataloader, accelerator: Accelerator, use_ground_truth: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and labels of an image dataloader (see `predict_logits`)."""
    logits, labels = predict_logits(
        model, dataloader, accelerator, lambda m, batch: image_forward(m, batch, use_ground_truth, accelerator)
    )
    return torch.from_numpy(logits).softmax(-1).numpy(), labels


def evaluate_classifier(model, dataloader, accelerator: Accelerator, forward) -> dict:
    """Validation scores over the whole (sharded) dataloader, gathered across processes, each image once."""
    T.broadcast_buffers(accelerator, model)
    logits, label = predict_logits(model, dataloader, accelerator, forward)
    config = T.unwrap_pretrained(accelerator, model).config
    names = [config.id2label[i] for i in range(config.num_labels)]
    return T.classification_metrics(torch.from_numpy(logits).softmax(-1).numpy(), label, names)


def fit_calibration(
    config, logits: np.ndarray, labels: np.ndarray, train_counts: list[int], tune_logit_bias: bool, calibrate: bool
) -> dict:
    """Fit on held-out (validation) logits, in this order, and store in `config`: the post-hoc logit adjustment
    `-tau * log(train prior)` with the tau (grid -1..1) of best balanced accuracy (`config.logit_bias`), then the
    temperature of least negative log-likelihood (`config.temperature`). Returns what was fitted and the scores."""
    names = [config.id2label[i] for i in range(config.num_labels)]
    report: dict = {"split": "validation"}
    before = T.classification_metrics(torch.from_numpy(logits).softmax(-1).numpy(), labels, names)
    config.logit_bias = None
    if tune_logit_bias:
        counts = np.maximum(np.asarray(train_counts, dtype=np.float64), 1.0)
        log_prior = np.log(counts / counts.sum())
        present = np.unique(labels)
        scores = {}
        for tau in np.round(np.arange(-1.0, 1.01, 0.1), 2):
            predicted = (logits - tau * log_prior).argmax(1)
            scores[float(tau)] = float(np.mean([(predicted[labels == k] == k).mean() for k in present]))
        tau = max(scores, key=lambda t: (scores[t], -abs(t)))  # ties: the smallest change
        config.logit_bias = (-tau * log_prior).tolist()
        logits = logits + np.asarray(config.logit_bias)
        report.update(logit_bias_tau=tau, balanced_accuracy_by_tau=scores)
        logger.info(
            f"Post-hoc logit adjustment tau {tau}: validation balanced accuracy {scores[0.0]:.4f} -> {scores[tau]:.4f}"
        )
    temperature = T.fit_temperature(logits, labels) if calibrate else 1.0
    after = T.classification_metrics(torch.from_numpy(logits / temperature).softmax(-1).numpy(), labels, names)
    config.temperature = temperature
    report.update(
        temperature=temperature,
        ece_before=before["ece"],
        ece_after=after["ece"],
        balanced_accuracy_before=before["balanced_accuracy"],
        balanced_accuracy=after["balanced_accuracy"],
    )
    logger.info(f"Temperature {temperature:.3f}: validation ECE {before['ece']:.4f} -> {after['ece']:.4f}")
    return report


def cached_dataloaders(
    accelerator: Accelerator, args: ClassifierArguments, model, splits, train_transform, eval_transform, output_dir
):
    """`--frozen-stages`: the frozen part's outputs for `--cached-views` training views and the validation split,
    computed once (or read back from `output_dir/feature-cache`), as this process's training and validation loaders."""
    model.to(accelerator.device)
    batch_size = args.eval_batch_size or 2 * args.batch_size
    main = accelerator.is_local_main_process
    rank = accelerator.process_index
    cache_dir = output_dir / "feature-cache"
    train_images = accelerator.prepare(build_dataloader(splits["train"], train_transform, batch_size))
    eval_images = accelerator.prepare(build_dataloader(splits["validation"], eval_transform, batch_size))
    settings = {"seed": args.seed, "train_masks": args.train_masks, "size": model.config.image_size}
    weights = FC.weights_digest(model, args.frozen_stages)
    train_ids = column_values(splits["train"], "image_id")
    views = []
    for view in range(args.cached_views):
        train_transform.set_epoch(view)
        key = FC.cache_key(weights, args.frozen_stages, train_ids, {**settings, "view": view})
        views.append(
            FC.load_or_compute(
                cache_dir / f"train-view{view}-rank{rank}.pt",
                key,
                lambda view=view: FC.compute_view(
                    model,
                    train_images,
                    args.frozen_stages,
                    lambda batch: lesion_masks(model, batch, args.train_masks == "ground_truth", accelerator),
                    torch.float16,
                    f"cache train view {view + 1}/{args.cached_views}",
                    not main,
                ),
            )
        )
    train_transform.set_epoch(0)
    key = FC.cache_key(
        weights, args.frozen_stages, column_values(splits["validation"], "image_id"), {"eval_masks": args.eval_masks}
    )
    eval_view = FC.load_or_compute(
        cache_dir / f"validation-rank{rank}.pt",
        key,
        lambda: FC.compute_view(
            model,
            eval_images,
            args.frozen_stages,
            lambda batch: lesion_masks(model, batch, args.eval_masks == "ground_truth", accelerator),
            torch.float32,
            "cache validation",
            not main,
        ),
    )
    train = FC.CachedLoader(FC.CachedFeatures(views, train=True, seed=args.seed), args.batch_size, True, args.seed)
    return train, FC.CachedLoader(FC.CachedFeatures([eval_view], train=False), batch_size, False, args.seed)


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

    if args.logit_adjustment:
        counts = np.maximum(np.asarray(class_counts(splits["train"]), dtype=np.float64), 1.0)
        model.config.logit_adjustment = (args.logit_adjustment * np.log(counts / counts.sum())).tolist()
    else:
        model.config.logit_adjustment = None
    model.config.temperature = 1.0  # fitted again after training (--calibrate)
    model.config.logit_bias = None  # likewise (--tune-logit-bias)

    train_transform = SkinLesionTransform(processor, train=True, metadata_processor=metadata, seed=args.seed)
    eval_transform = SkinLesionTransform(processor, train=False, metadata_processor=metadata)
    use_ground_truth = args.train_masks == "ground_truth"
    eval_ground_truth = args.eval_masks == "ground_truth"
    size = processor.size["height"], processor.size["width"]
    loaders = None
    if args.frozen_stages:
        # Stage-1 recipe: freeze the early stages, cache their outputs, train the rest on them.
        FC.freeze_stages(model, args.frozen_stages)
        loaders = cached_dataloaders(accelerator, args, model, splits, train_transform, eval_transform, output_dir)
        train_model = FC.SkinDualNetFromFeatures(model, args.frozen_stages)
        first = FC.collate([loaders[0].dataset[0]])
        blank = {key: torch.zeros_like(value) for key, value in first.items() if isinstance(value, torch.Tensor)}

        def forward(model, batch, labels=False):
            return feature_forward(model, T.move_to(batch, accelerator.device), labels)

        def blank_batch() -> dict[str, torch.Tensor]:
            return {key: value.to(accelerator.device) for key, value in blank.items()}

        train_transform = loaders[0].dataset  # train_loop's set_epoch selects the cached view
    else:
        train_model = model

        def forward(model, batch, labels=False):
            return image_forward(model, batch, use_ground_truth if labels else eval_ground_truth, accelerator, labels)

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

    run = T.prepare_run(
        accelerator,
        args,
        train_model,
        splits,
        train_transform,
        eval_transform,
        output_dir,
        checkpoints_dir,
        tracker="skin-dualnet-classifier",
        dataloaders=loaders,
    )
    train_model, state = run.model, run.state

    # Train, validate every epoch, keep the best ----------------------------------------------------------------------
    T.train_loop(
        accelerator,
        args,
        run,
        train_transform,
        checkpoints_dir,
        timer,
        compute_loss=lambda model, batch: forward(model, batch, labels=True).loss,
        evaluate=lambda model: evaluate_classifier(model, run.eval_dataloader, accelerator, forward),
        blank_batch=blank_batch,
        best_key="balanced_accuracy",
        scores=SCORES,
    )

    # Temperature scaling on the validation split: stored in the config, so every entry point is calibrated -----------
    accelerator.wait_for_everyone()
    T.load_best(accelerator, train_model, checkpoints_dir / "best_model")
    calibration = None
    if args.calibrate or args.tune_logit_bias:
        T.broadcast_buffers(accelerator, train_model)
        logits, labels = predict_logits(train_model, run.eval_dataloader, accelerator, forward)
        calibration = fit_calibration(
            model.config, logits, labels, class_counts(splits["train"]), args.tune_logit_bias, args.calibrate
        )

    best = next((r for r in state.history if r["epoch"] == state.best_epoch), {})
    metrics = {
        "task": "classification",
        "best": {"metric": "balanced_accuracy", "value": state.best_metric, **best},
        "history": state.history,
        "split": split_summary,
        "bad_files": bad_files,
        "labels": names,
        "class_weights": weights,
        "logit_adjustment": model.config.logit_adjustment,
        "calibration": calibration,
        "steps": state.completed_steps,
        "num_processes": accelerator.num_processes,
        "wall_time_s": timer.elapsed(),
        "args": vars(args),
    }
    if accelerator.is_main_process:
        model.save_pretrained(output_dir, safe_serialization=True)
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
