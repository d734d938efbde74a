#!/usr/bin/env python
"""Fine-tune a pretrained skin-dualnet classifier on a new clinic's images, and report its scores before and after.

    python scripts/finetune.py --checkpoint org/skin-dualnet \
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
5. fine-tunes with the segmenter frozen (and, with `--freeze-encoders`, both image encoders too, BatchNorm statistics
   included: only the fusion, metadata encoder and head learn), keeps the epoch with the best validation balanced
   accuracy ("after"), and saves the model, its processor, metrics.json and a model card in `--output-dir`.
"""

import argparse
import copy
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from huggingface_hub import ModelCard
from tqdm.auto import tqdm
from transformers import AutoConfig, get_cosine_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _training as T  # noqa: E402
from train_classifier import lesion_masks, predict_probabilities  # noqa: E402

from modeling_skinlesion import SkinDualNet, SkinLesionImageProcessor, SkinLesionMetadataProcessor  # noqa: E402
from modeling_skinlesion.data import (  # noqa: E402
    SkinLesionTransform,
    balanced_class_weights,
    build_dataloader,
    column_values,
    grouped_split,
    label_names,
    load_clinic,
    validate_files,
)
from modeling_skinlesion.model_card import load_metrics, training_datasets, write_model_card  # noqa: E402

logger = logging.getLogger("finetune")
SCORES = ("accuracy", "balanced_accuracy", "macro_auc", "ece")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="Pretrained SkinDualNet: a Hub id or a saved folder.")
    parser.add_argument("--images", required=True, help="The clinic's image folder.")
    parser.add_argument("--csv", required=True, help="The clinic's CSV, one row per image.")
    parser.add_argument(
        "--column-map", nargs="+", required=True, help="KEY=COLUMN for image, label, age, sex, site, group_id, mask."
    )
    parser.add_argument("--output-dir", required=True, help="Where the fine-tuned model and metrics.json go.")
    parser.add_argument("--masks-dir", help="Folder the mask column is relative to (default: --images).")
    parser.add_argument("--source-name", default="clinic", help="Name of the clinic's data in the model card.")
    labels = parser.add_argument_group("labels and metadata")
    labels.add_argument("--labels", nargs="+", help="The clinic's classes, in this order (default: sorted).")
    labels.add_argument(
        "--label-map",
        nargs="+",
        default=[],
        help="CLINIC_CLASS=CHECKPOINT_CLASS[,CHECKPOINT_CLASS...]: the checkpoint classes a clinic class stands for.",
    )
    labels.add_argument("--site-map", nargs="+", default=[], help="CLINIC_VALUE=SITE synonyms for anatomical sites.")
    labels.add_argument("--sex-map", nargs="+", default=[], help="CLINIC_VALUE=SEX synonyms.")
    training = parser.add_argument_group("training")
    training.add_argument("--freeze-encoders", action="store_true", help="Freeze both image encoders.")
    training.add_argument("--epochs", type=int, default=5)
    training.add_argument("--max-steps", type=int, help="Stop after this many optimizer steps.")
    training.add_argument("--batch-size", type=int, default=16)
    training.add_argument("--lr", type=float, default=1e-4, help="Peak learning rate (AdamW, cosine with warmup).")
    training.add_argument("--weight-decay", type=float, default=1e-4)
    training.add_argument("--warmup-ratio", type=float, default=0.1)
    training.add_argument("--grad-accum", type=int, default=1, help="Gradient accumulation steps.")
    training.add_argument("--max-grad-norm", type=float, default=1.0, help="Gradient clipping (0 = off).")
    training.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    training.add_argument("--class-weights", default="balanced", choices=("balanced", "none"))
    training.add_argument("--train-masks", default="ground_truth", choices=("ground_truth", "predicted"))
    training.add_argument("--eval-masks", default="predicted", choices=("predicted", "ground_truth"))
    split = parser.add_argument_group("split")
    split.add_argument("--val-size", type=float, default=0.2)
    split.add_argument("--split-seed", type=int, default=0)
    split.add_argument("--seed", type=int, default=42)
    split.add_argument("--bad-files", default="skip", choices=("skip", "raise", "unchecked"))
    split.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(argv)
    for flag, pairs in (
        ("--column-map", args.column_map),
        ("--label-map", args.label_map),
        ("--site-map", args.site_map),
        ("--sex-map", args.sex_map),
    ):
        if any("=" not in pair for pair in pairs):
            parser.error(f"{flag} entries must be KEY=VALUE, got {pairs}")
    for flag, value in (
        ("--epochs", args.epochs),
        ("--batch-size", args.batch_size),
        ("--grad-accum", args.grad_accum),
    ):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    return args


def pairs_to_dict(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


# --------------------------------------------------------------------------------------------------------------------
# Labels and metadata
# --------------------------------------------------------------------------------------------------------------------
def resolve_label_map(clinic: list[str], checkpoint: list[str], pairs: list[str]) -> dict[str, list[str]]:
    """Clinic class → the checkpoint classes it stands for (same-named classes map to each other by default)."""
    mapping = {name: [name] for name in clinic if name in checkpoint}
    for key, value in pairs_to_dict(pairs).items():
        if key not in clinic:
            raise ValueError(f"--label-map names the clinic class {key!r}, but the clinic's classes are {clinic}.")
        targets = [t.strip() for t in value.split(",") if t.strip()]
        unknown = [t for t in targets if t not in checkpoint]
        if unknown or not targets:
            raise ValueError(
                f"--label-map {key}={value}: {unknown or value!r} are not classes of the checkpoint; its classes are "
                f"{checkpoint}."
            )
        mapping[key] = targets
    used = Counter(t for targets in mapping.values() for t in targets)
    twice = sorted(t for t, n in used.items() if n > 1)
    if twice:
        raise ValueError(f"--label-map assigns the checkpoint classes {twice} to several clinic classes.")
    return mapping


def collapse_probabilities(
    probabilities: np.ndarray, checkpoint: list[str], clinic: list[str], mapping: dict[str, list[str]]
) -> np.ndarray:
    """Checkpoint probabilities → clinic-class probabilities: each clinic class sums its mapped checkpoint classes;
    rows are renormalised over the mapped mass (a row with none becomes uniform)."""
    collapsed = np.zeros((probabilities.shape[0], len(clinic)))
    for j, name in enumerate(clinic):
        for target in mapping.get(name, []):
            collapsed[:, j] += probabilities[:, checkpoint.index(target)]
    totals = collapsed.sum(axis=1, keepdims=True)
    return np.where(totals > 0, collapsed / np.where(totals > 0, totals, 1), 1.0 / len(clinic))


def extend_synonyms(config, site_pairs: list[str], sex_pairs: list[str]) -> dict[str, dict[str, str]]:
    """Add the clinic's site/sex spellings to the config's synonyms (checked against its vocabularies)."""
    added = {}
    for field, pairs, vocab in (("site", site_pairs, config.site_vocab), ("sex", sex_pairs, config.sex_vocab)):
        new = {key.strip(): value.strip() for key, value in pairs_to_dict(pairs).items()}
        unknown = {key: value for key, value in new.items() if value not in vocab}
        if unknown:
            raise ValueError(f"--{field}-map targets {unknown} are not in the model's {field} vocabulary {vocab}.")
        synonyms = dict(getattr(config, f"{field}_synonyms"))
        synonyms.update({key: value for key, value in new.items()})
        setattr(config, f"{field}_synonyms", synonyms)
        added[field] = new
    return added


def metadata_report(dataset, metadata: SkinLesionMetadataProcessor) -> dict[str, Any]:
    """How the clinic's age/sex/site values map onto the model's vocabularies: recognised, missing, and unknown values
    (treated as missing) with their counts."""
    columns = {name: column_values(dataset, name) for name in ("age", "sex", "site")}
    report: dict[str, Any] = {}
    for field in ("sex", "site"):
        recognised, missing, unknown = Counter(), 0, Counter()
        for raw in columns[field]:
            if raw is None:
                missing += 1
                continue
            parsed = metadata.normalize_record({field: raw})[field]
            if parsed is None:
                unknown[raw] += 1
            else:
                recognised[parsed] += 1
        report[field] = {"recognised": dict(recognised), "missing": missing, "unknown_as_missing": dict(unknown)}
    ages = [metadata.parse_age(value) for value in columns["age"]]
    report["age"] = {
        "recognised": int(sum(a is not None for a in ages)),
        "missing": int(sum(value is None or bool(np.isnan(value)) for value in columns["age"])),
    }
    return report


def base_training_sets(checkpoint: str) -> list[str]:
    """The training sets of the checkpoint, from its model card or its training run's metrics.json, if recorded."""
    folder = Path(checkpoint)
    try:
        card = ModelCard.load(folder / "README.md" if folder.is_dir() else checkpoint)
        if card.data.datasets:
            return list(card.data.datasets)
    except Exception as error:  # no card, not a card, or offline: huggingface_hub raises several kinds
        logger.info(f"No model card for {checkpoint} ({type(error).__name__}); looking for its metrics.json.")
    if (folder / "metrics.json").is_file():
        return training_datasets(load_metrics(folder / "metrics.json"))
    return []


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------
def build_model(
    checkpoint: str, base: SkinDualNet, clinic: list[str], mapping: dict[str, list[str]], weights: list[float] | None
) -> SkinDualNet:
    """The model to fine-tune: the checkpoint itself when the classes match, else the checkpoint with a new head for
    the clinic's classes, warm-started from the old head's row of each one-to-one mapped class."""
    checkpoint_labels = [base.config.id2label[i] for i in range(base.config.num_labels)]
    # The checkpoint's calibration (bias, temperature) and loss offsets belong to its own data: start uncalibrated
    # (scripts/calibrate.py fits them again on the clinic's held-out cases).
    uncalibrated = {"logit_bias": None, "logit_adjustment": None, "temperature": 1.0}
    if clinic == checkpoint_labels:
        base.config.class_weights = weights
        for key, value in uncalibrated.items():
            setattr(base.config, key, value)
        return base
    model = SkinDualNet.from_pretrained(
        checkpoint,
        id2label=dict(enumerate(clinic)),
        label2id={name: i for i, name in enumerate(clinic)},
        class_weights=weights,
        ignore_mismatched_sizes=True,
        **uncalibrated,
    )
    old_head, new_head = base.classifier[-1], model.classifier[-1]
    with torch.no_grad():
        for j, name in enumerate(clinic):
            if len(mapping.get(name, [])) == 1:
                source = checkpoint_labels.index(mapping[name][0])
                new_head.weight[j] = old_head.weight[source]
                new_head.bias[j] = old_head.bias[source]
    return model


def predict(model, dataloader, accelerator: Accelerator, use_ground_truth: bool) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels over the (sharded) dataloader, gathered across processes, each image once, with the
    main process's BatchNorm statistics (the ones the saved model keeps)."""
    T.broadcast_buffers(accelerator, model)
    probabilities, labels = predict_probabilities(model, dataloader, accelerator, use_ground_truth)
    return probabilities.astype(np.float64), labels


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    timer = T.Timer()
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, mixed_precision=args.mixed_precision)
    T.setup_logging(accelerator)
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.ERROR)
    set_seed(args.seed)

    # Checkpoint and the clinic's data --------------------------------------------------------------------------------
    config = AutoConfig.from_pretrained(args.checkpoint)
    if config.model_type != "skin_dualnet":
        raise ValueError(f"--checkpoint {args.checkpoint} is a {config.model_type!r} model, not a SkinDualNet.")
    base = SkinDualNet.from_pretrained(args.checkpoint)
    checkpoint_labels = [base.config.id2label[i] for i in range(base.config.num_labels)]
    with accelerator.main_process_first():
        dataset = load_clinic(
            args.images,
            args.csv,
            pairs_to_dict(args.column_map),
            label_names=args.labels,
            masks_dir=args.masks_dir,
            source=args.source_name,
        )
    if "label" not in pairs_to_dict(args.column_map):
        raise ValueError("--column-map must map `label` to the CSV column holding each image's class.")
    labelled = [i for i, label in enumerate(column_values(dataset, "label")) if label >= 0]
    if len(labelled) < len(dataset):
        logger.info(f"Dropping {len(dataset) - len(labelled)} images without a label")
        dataset = dataset.select(labelled)
    clinic = label_names(dataset)
    mapping = resolve_label_map(clinic, checkpoint_labels, args.label_map)
    synonyms = extend_synonyms(base.config, args.site_map, args.sex_map)
    metadata = SkinLesionMetadataProcessor.from_config(base.config)
    report = metadata_report(dataset, metadata)
    for field in ("sex", "site"):
        if report[field]["unknown_as_missing"]:
            logger.warning(
                f"{field}: values the model does not know, treated as missing (map them with --{field}-map): "
                f"{report[field]['unknown_as_missing']}"
            )
    logger.info(f"Clinic classes {clinic}; checkpoint classes {checkpoint_labels}; label map {mapping}")

    splits = grouped_split(dataset, val_size=args.val_size, seed=args.split_seed, stratify_column="label")
    bad_files = {}
    if args.bad_files != "unchecked":
        for name in ("train", "validation"):
            splits[name], summary = validate_files(splits[name], on_error=args.bad_files, require_masks=False)
            bad_files[name] = summary.to_dict()
    split_summary = T.describe_split(splits)
    logger.info(f"Split: {split_summary}")
    weights = balanced_class_weights(splits["train"]) if args.class_weights == "balanced" else None

    try:
        processor = SkinLesionImageProcessor.from_pretrained(args.checkpoint)
    except OSError:
        processor = SkinLesionImageProcessor.from_model_config(base.config)
    train_transform = SkinLesionTransform(processor, train=True, metadata_processor=metadata, seed=args.seed)
    eval_transform = SkinLesionTransform(processor, train=False, metadata_processor=metadata)
    train_dataloader = build_dataloader(
        splits["train"], train_transform, args.batch_size, shuffle=True, num_workers=args.num_workers, seed=args.seed
    )
    eval_dataloader = build_dataloader(splits["validation"], eval_transform, 2 * args.batch_size)
    train_dataloader, eval_dataloader = accelerator.prepare(train_dataloader, eval_dataloader)

    # Before: the checkpoint as it is, its classes collapsed onto the clinic's ---------------------------------------
    use_gt_eval = args.eval_masks == "ground_truth"
    probabilities, labels = predict(base.to(accelerator.device), eval_dataloader, accelerator, use_gt_eval)
    unmapped = [name for name in clinic if name not in mapping]
    before = T.classification_metrics(
        collapse_probabilities(probabilities, checkpoint_labels, clinic, mapping), labels, clinic
    )
    before["unmapped_classes"] = unmapped
    logger.info(
        f"Before fine-tuning: {T.format_metrics(before, SCORES)}"
        + (f" (no mapping for {unmapped})" if unmapped else "")
    )

    # The model to fine-tune: new head if the classes differ, clinic synonyms, frozen parts ---------------------------
    model = build_model(args.checkpoint, base, clinic, mapping, weights)
    model.config.site_synonyms, model.config.sex_synonyms = base.config.site_synonyms, base.config.sex_synonyms
    if model is not base:
        del base
    model.segmenter.requires_grad_(False)
    frozen = [model.image_encoder, model.lesion_encoder] if args.freeze_encoders else []
    frozen = [encoder for encoder in frozen if encoder is not None]
    for encoder in frozen:
        encoder.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"Trainable parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")

    optimizer = T.build_optimizer(model, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    steps_per_epoch, max_steps, epochs = T.training_schedule(len(train_dataloader), args)
    scheduler = accelerator.prepare(
        get_cosine_schedule_with_warmup(
            optimizer,
            num_warmup_steps=int(args.warmup_ratio * max_steps) * accelerator.num_processes,
            num_training_steps=max_steps * accelerator.num_processes,
        )
    )

    # Fine-tune, validate every epoch, keep the best ---------------------------------------------------------------
    history, best, best_state, completed = [], None, None, 0
    progress = tqdm(total=max_steps, disable=not accelerator.is_local_main_process, desc="finetune")
    for epoch in range(epochs):
        model.train()
        for encoder in frozen:  # frozen means frozen: their BatchNorm statistics stay the checkpoint's too
            encoder.eval()
        train_transform.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
        for batch in train_dataloader:
            if batch["pixel_values"].shape[0] == 0:
                continue
            with accelerator.accumulate(model):
                loss = model(
                    pixel_values=batch["pixel_values"],
                    age=batch["age"],
                    sex_ids=batch["sex_ids"],
                    site_ids=batch["site_ids"],
                    lesion_mask=lesion_masks(model, batch, args.train_masks == "ground_truth", accelerator),
                    labels=batch["labels"],
                ).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            loss_sum += loss.detach().float()
            loss_count += 1
            if accelerator.sync_gradients:
                completed += 1
                progress.update(1)
            if completed >= max_steps:
                break
        probabilities, labels = predict(model, eval_dataloader, accelerator, use_gt_eval)
        validation = T.classification_metrics(probabilities, labels, clinic)
        train_loss = accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean").item()
        history.append({"epoch": epoch, "step": completed, "train_loss": train_loss, "validation": validation})
        if best is None or validation["balanced_accuracy"] > best["validation"]["balanced_accuracy"]:
            best = history[-1]
            best_state = {k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        logger.info(
            f"epoch {epoch + 1}/{epochs} train_loss {train_loss:.4f} {T.format_metrics(validation, SCORES)} | "
            f"{timer.elapsed():.0f}s"
        )
        if completed >= max_steps:
            break
    progress.close()

    # Save the best epoch's model with its processor, the report and a model card -----------------------------------
    model = accelerator.unwrap_model(model)
    model.load_state_dict(best_state)
    after = best["validation"]
    logger.info(
        "Validation before -> after fine-tuning: "
        + ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in SCORES if before.get(k) is not None)
    )
    result = {
        "task": "classification",
        "base_model": args.checkpoint,
        "eval_dataset": args.source_name,
        "labels": clinic,
        "checkpoint_labels": checkpoint_labels,
        "label_map": mapping,
        "new_head": clinic != checkpoint_labels,
        "freeze_encoders": args.freeze_encoders,
        "trainable_parameters": trainable,
        "metadata": {"added_synonyms": synonyms, **report},
        "before": before,
        "after": after,
        "best": {"metric": "balanced_accuracy", **copy.deepcopy(best)},
        "history": history,
        "split": split_summary,
        "bad_files": bad_files,
        "wall_time_s": timer.elapsed(),
        "args": {**vars(args), "dataset": base_training_sets(args.checkpoint) + [args.source_name]},
    }
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output_dir, safe_serialization=True)
        processor.save_pretrained(output_dir)
        T.write_json(output_dir / "metrics.json", result)
        write_model_card(
            output_dir,
            model.config,
            repo_id=f"{args.source_name}/skin-dualnet-finetuned",
            datasets=result["args"]["dataset"],
            metrics=result,
            base_model=args.checkpoint,
        )
        logger.info(f"Saved the fine-tuned model (epoch {best['epoch'] + 1}) to {output_dir}")
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
