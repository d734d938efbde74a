#!/usr/bin/env python
r"""Fine-tune a pretrained skin-dualnet classifier on a new clinic's images, and report its scores before and after.

    python scripts/finetune.py --checkpoint checkpoints/skin-dualnet-small \
        --images clinic/photos --csv clinic/cases.csv \
        --column-map image=file label=diagnosis age=age sex=gender site=body_site group_id=patient \
        --label-map naevus=nv melanoma=mel other=akiec,bcc,bkl,df,vasc \
        --site-map "upper arm=upper extremity" "sole=palms/soles" --sex-map "unspecified=unknown" \
        --output-dir runs/clinic --epochs 5 --freeze-encoders

(`accelerate launch scripts/finetune.py ...` runs it on several GPUs.) The clinic's data is a folder of images plus a
CSV whose columns `--column-map` names (only `image` and `label` are required; see `modeling_skinlesion.data.
load_clinic`). The command:

1. splits the clinic's images by `group_id` (patient or lesion), stratified by class (`--val-size`, `--split-seed`);
2. scores the checkpoint as it is on the validation images ("before"): each clinic class gets the probability of
   the checkpoint classes `--label-map` assigns to it (a clinic class named like a checkpoint class maps to it by
   default; unmapped checkpoint classes are dropped and the rest renormalised);
3. when the clinic's classes differ from the checkpoint's, gives the model a new head for them (loaded with the new
   `id2label` and `ignore_mismatched_sizes=True`); a clinic class mapped to exactly one checkpoint class starts from
   that class's row of the old head;
4. maps the clinic's metadata vocabulary onto the model's: `--site-map`/`--sex-map` add synonyms (saved in the new
   config, so the fine-tuned model keeps understanding them); values still unknown are treated as missing, and the
   report in metrics.json lists them;
5. fine-tunes with the training loop of train_classifier.py (same options, checkpoints and `--resume`), the
   segmenter frozen (and, with `--freeze-encoders`, both image encoders too, BatchNorm statistics included: only the
   fusion, metadata encoder and head learn), keeps the epoch with the best validation balanced accuracy ("after"),
   and saves the model, its processor, metrics.json, splits.json and a model card in `--output-dir`. The model
   starts uncalibrated: `scripts/calibrate.py` fits its temperature on the clinic's held-out cases.

Fine-tuning starts from trained weights, so four defaults differ from train_classifier.py's: --epochs 5, --lr 1e-4,
--warmup-ratio 0.1 and --val-size 0.2 (see `FinetuneArguments`).
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _arguments import (  # noqa: E402
    ClassifierArguments,
    DataArguments,
    SplitArguments,
    TrainingArguments,
    check_pairs,
    parse_arguments,
    with_default,
)

logger = logging.getLogger("finetune")  # INFO on the main process, errors elsewhere (`_training.setup_logging`)


@dataclass(kw_only=True)
class FinetuneArguments(ClassifierArguments, SplitArguments, TrainingArguments):
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(FinetuneArguments, argv, description=__doc__)

    # The heavy imports come after parsing, so that --help and usage errors answer at once.
    import _evaluation as E
    import _finetuning as F
    import _training as T
    import torch
    from transformers import AutoConfig

    from modeling_skinlesion import SkinDualNet, SkinLesionImageProcessor, SkinLesionMetadataProcessor
    from modeling_skinlesion.data import SkinLesionTransform, balanced_class_weights, build_dataloader, label_names

    output_dir = Path(args.output_dir)
    timer = T.Timer()

    # Accelerator, logging (INFO on the main process only), seed ------------------------------------------------------
    accelerator = T.start_accelerator(args, output_dir)

    # Checkpoint and the clinic's data: labels mapped, metadata spellings mapped, grouped split -----------------------
    config = AutoConfig.from_pretrained(args.checkpoint)
    if config.model_type != "skin_dualnet":
        raise ValueError(f"--checkpoint {args.checkpoint} is a {config.model_type!r} model, not a SkinDualNet.")
    base = SkinDualNet.from_pretrained(args.checkpoint)
    checkpoint_labels = [base.config.id2label[i] for i in range(base.config.num_labels)]
    with accelerator.main_process_first():
        dataset = F.load_cases(args)
        splits, bad_files = T.prepare_splits(args, dataset, stratify_column="label", require_masks=False)
    clinic = label_names(dataset)
    mapping = F.resolve_label_map(clinic, checkpoint_labels, args.label_map)
    synonyms = F.extend_synonyms(base.config, args.site_map, args.sex_map)
    metadata = SkinLesionMetadataProcessor.from_config(base.config)
    report = F.metadata_report(dataset, metadata)
    for name in ("sex", "site"):
        if report[name]["unknown_as_missing"]:
            logger.warning(
                f"{name}: values the model does not know, treated as missing (map them with --{name}-map): "
                f"{report[name]['unknown_as_missing']}"
            )
    logger.info(f"Clinic classes {clinic}; checkpoint classes {checkpoint_labels}; label map {mapping}")
    split_summary = T.describe_split(splits)
    logger.info(f"Split: {split_summary}")
    if accelerator.is_main_process:
        T.write_split_ids(output_dir / "splits.json", splits, args, ["clinic"], [args.images])
    weights = balanced_class_weights(splits["train"]) if args.class_weights == "balanced" else None

    try:
        processor = SkinLesionImageProcessor.from_pretrained(args.checkpoint)
    except OSError:
        processor = SkinLesionImageProcessor.from_model_config(base.config)
    size = processor.size["height"], processor.size["width"]
    train_transform = SkinLesionTransform(processor, train=True, metadata_processor=metadata, seed=args.seed)
    eval_transform = SkinLesionTransform(processor, train=False, metadata_processor=metadata)
    use_ground_truth = {True: args.train_masks == "ground_truth", False: args.eval_masks == "ground_truth"}

    def forward(model, batch, labels=False):
        return E.image_forward(model, batch, use_ground_truth[labels], labels)

    # Before: the checkpoint as it is, its classes collapsed onto the clinic's ---------------------------------------
    eval_batch_size = args.eval_batch_size or 2 * args.batch_size
    before_loader = accelerator.prepare(build_dataloader(splits["validation"], eval_transform, eval_batch_size))
    logits, labels = E.predict_logits(base.to(accelerator.device), before_loader, accelerator, forward)
    probabilities = torch.from_numpy(logits).softmax(-1).double().numpy()
    before = E.classification_metrics(
        F.collapse_probabilities(probabilities, checkpoint_labels, clinic, mapping), labels, clinic
    )
    before["unmapped_classes"] = [name for name in clinic if name not in mapping]
    logger.info(f"Before fine-tuning: {T.format_metrics(before, E.CLASSIFICATION_SCORES)}")

    # The model to fine-tune: new head if the classes differ, the clinic's synonyms, frozen parts ---------------------
    model = F.build_model(args.checkpoint, base, clinic, mapping, weights)
    model.config.site_synonyms, model.config.sex_synonyms = base.config.site_synonyms, base.config.sex_synonyms
    del base
    model.segmenter.requires_grad_(False)
    frozen = [model.image_encoder, model.lesion_encoder] if args.freeze_encoders else []
    frozen = tuple(encoder for encoder in frozen if encoder is not None)
    for encoder in frozen:
        encoder.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"Trainable parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")

    # Loaders, optimizer, schedule, prepare, resume ------------------------------------------------------------------
    run = T.prepare_run(
        accelerator, args, model, splits, train_transform, eval_transform, tracker="skin-dualnet-finetune"
    )
    state = run.state

    # Fine-tune, validate every epoch, keep the best ----------------------------------------------------------------
    T.train_loop(
        accelerator,
        args,
        run,
        timer,
        **E.classifier_task(forward, run.eval_dataloader, accelerator),
        blank_batch=lambda: E.blank_image_batch(size, accelerator.device, classifier=True),
        frozen=frozen,
    )

    # Save the best epoch's model with its processor, the report and a model card -----------------------------------
    after = next(r for r in state.history if r["epoch"] == state.best_epoch)["validation"]
    logger.info(
        "Validation before -> after fine-tuning: "
        + ", ".join(
            f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in E.CLASSIFICATION_SCORES if before.get(k) is not None
        )
    )
    trained_on = F.base_training_sets(args.checkpoint) + [args.source_name]
    result = T.run_record(
        accelerator,
        args,
        state,
        timer,
        task="classification",
        base_model=args.checkpoint,
        eval_dataset=args.source_name,
        labels=clinic,
        checkpoint_labels=checkpoint_labels,
        label_map=mapping,
        new_head=clinic != checkpoint_labels,
        freeze_encoders=args.freeze_encoders,
        trainable_parameters=trainable,
        metadata={"added_synonyms": synonyms, **report},
        before=before,
        after=after,
        split=split_summary,
        bad_files=bad_files,
    )
    result["args"]["dataset"] = trained_on  # the card's training sets: the checkpoint's, then the clinic's
    T.save_run(
        accelerator,
        output_dir,
        accelerator.unwrap_model(run.model),
        processor,
        result,
        repo_id=f"{args.source_name}/skin-dualnet-finetuned",
        datasets=trained_on,
        base_model=args.checkpoint,
        training=T.training_facts(args, result),
    )
    logger.info(f"Saved the fine-tuned model (epoch {state.best_epoch + 1}) to {output_dir}")
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
