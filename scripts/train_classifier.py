r"""Train the skin-dualnet classifier (dual image encoders, cross-attention fusion, metadata) with Accelerate.

    accelerate launch scripts/train_classifier.py \
        --config configuration/skin-dualnet.json --segmenter runs/segmenter \
        --dataset ham10000 --data-root ../shared/data/ham10000 \
        --output-dir runs/classifier --epochs 30 --batch-size 16 --class-weights balanced

The segmenter stays frozen. Training uses the ground-truth lesion masks of the images that have one and the
segmenter's predicted masks for the others; validation uses the segmenter's masks (as at inference) unless
`--eval-masks ground_truth`. `--segmenter PATH` puts a trained segmenter inside the classifier, so the saved folder
is the whole system. Each epoch is scored by the shipped `lesion_classification` metric; the epoch with the best
balanced accuracy is kept, calibrated on the validation split (temperature, and with --tune-logit-bias a post-hoc
logit adjustment, both stored in its config) and saved with its image processor, next to metrics.json, splits.json
and a model card. Multi-GPU, multi-node and CPU multi-process launches are as for train_segmenter.py
(`accelerate launch --multi_gpu ...` or `torchrun --nproc_per_node N ...`).
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))

from modeling_skinlesion.training.arguments import (  # noqa: E402
    CACHED_VIEWS_HELP,
    ClassifierArguments,
    DataArguments,
    ModelArguments,
    SplitArguments,
    TrainingArguments,
    parse_arguments,
)

logger = logging.getLogger(
    "train_classifier"
)  # INFO on the main process, errors elsewhere (`_training.setup_logging`)


@dataclass(kw_only=True)
class TrainClassifierArguments(ModelArguments, ClassifierArguments, DataArguments, SplitArguments, TrainingArguments):
    _argument_group_name = "model"

    config: str = field(
        metadata={
            "help": "Classifier preset JSON (e.g. configuration/skin-dualnet.json or skin-dualnet-small.json) or a "
            "saved classifier folder to start from."
        }
    )
    segmenter: str | None = field(
        default=None, metadata={"help": "Trained segmenter folder to put inside the classifier (it stays frozen)."}
    )
    label_set: Literal["ham10000", "isic2019"] = field(
        default="ham10000", metadata={"help": "Class names for HAM10000 (use isic2019 to combine with ISIC 2019)."}
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
    cached_views: int = field(default=2, metadata={"help": CACHED_VIEWS_HELP})
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(TrainClassifierArguments, argv, description=__doc__)

    # The heavy imports come after parsing, so that --help and usage errors answer at once.
    import numpy as np
    import torch
    from transformers import AutoConfig

    from modeling_skinlesion import (
        SkinDualNet,
        SkinDualNetConfig,
        SkinLesionImageProcessor,
        SkinLesionMetadataProcessor,
        SkinLesionSegmenter,
    )
    from modeling_skinlesion.data import SkinLesionTransform, balanced_class_weights, class_counts, label_names
    from modeling_skinlesion.training import evaluation as E
    from modeling_skinlesion.training import feature_cache as FC
    from modeling_skinlesion.training import loop as T

    output_dir = Path(args.output_dir)
    timer = T.Timer()

    # Accelerator, logging (INFO on the main process only), seed ------------------------------------------------------
    accelerator = T.start_accelerator(args, output_dir)

    # Data: labelled images (masks where available), grouped split stratified by class, file check ----------------
    with accelerator.main_process_first():
        dataset = T.load_sources(args, "classification", label_set=args.label_set)
        splits, bad_files = T.prepare_splits(args, dataset, stratify_column="label", require_masks=False)
    split_summary = T.describe_split(splits)
    logger.info(f"Split: {split_summary}")
    if accelerator.is_main_process:
        T.write_split_ids(output_dir / "splits.json", splits, args, args.dataset, args.data_root)
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

    # Inputs: images, or with --frozen-stages the cached outputs of the frozen stages --------------------------------
    train_transform = SkinLesionTransform(processor, train=True, metadata_processor=metadata, seed=args.seed)
    eval_transform = SkinLesionTransform(processor, train=False, metadata_processor=metadata)
    size = processor.size["height"], processor.size["width"]
    loaders = None
    if args.frozen_stages:
        FC.freeze_stages(model, args.frozen_stages)
        loaders = FC.cached_dataloaders(accelerator, args, model, splits, train_transform, eval_transform, output_dir)
        train_model = FC.SkinDualNetFromFeatures(model, args.frozen_stages)
        first = FC.collate([loaders[0].dataset[0]])
        blank = {key: torch.zeros_like(value) for key, value in first.items() if isinstance(value, torch.Tensor)}

        def forward(model, batch, labels=False):
            return E.feature_forward(model, T.move_to(batch, accelerator.device), labels)

        def blank_batch() -> dict[str, torch.Tensor]:
            return {key: value.to(accelerator.device) for key, value in blank.items()}

        train_transform = loaders[0].dataset  # train_loop's set_epoch selects the cached view
    else:
        train_model = model
        use_ground_truth = {True: args.train_masks == "ground_truth", False: args.eval_masks == "ground_truth"}

        def forward(model, batch, labels=False):
            return E.image_forward(model, batch, use_ground_truth[labels], labels)

        def blank_batch() -> dict[str, torch.Tensor]:
            return E.blank_image_batch(size, accelerator.device, classifier=True)

    # Loaders, optimizer, schedule, prepare, resume ------------------------------------------------------------------
    run = T.prepare_run(
        accelerator,
        args,
        train_model,
        splits,
        train_transform,
        eval_transform,
        tracker="skin-dualnet-classifier",
        dataloaders=loaders,
    )
    train_model, state = run.model, run.state

    # Train, validate every epoch, keep the best ----------------------------------------------------------------------
    T.train_loop(
        accelerator,
        args,
        run,
        timer,
        **E.classifier_task(forward, run.eval_dataloader, accelerator),
        blank_batch=blank_batch,
    )

    # Calibration on the validation split: stored in the config, so every entry point is calibrated -----------------
    calibration = None
    if args.calibrate or args.tune_logit_bias:
        E.broadcast_buffers(accelerator, train_model)
        logits, labels = E.predict_logits(train_model, run.eval_dataloader, accelerator, forward)
        calibration = E.fit_calibration(
            model.config, logits, labels, class_counts(splits["train"]), args.tune_logit_bias, args.calibrate
        )

    # Save the best model, its processor, metrics and a model card ---------------------------------------------------
    metrics = T.run_record(
        accelerator,
        args,
        state,
        timer,
        task="classification",
        split=split_summary,
        bad_files=bad_files,
        labels=names,
        class_weights=weights,
        logit_adjustment=model.config.logit_adjustment,
        calibration=calibration,
    )
    T.save_run(
        accelerator,
        output_dir,
        model,
        processor,
        metrics,
        repo_id=f"org/{output_dir.name}",
        training={"preset": args.config, **T.training_facts(args, metrics)},
    )
    logger.info(
        f"Saved the best model (epoch {state.best_epoch + 1}, balanced accuracy {state.best_metric:.4f}) "
        f"to {output_dir}"
    )
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
