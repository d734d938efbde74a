"""Fine-tuning on a new clinic's images, labels and metadata, from Python as from scripts/finetune.py.

    from modeling_skinlesion.training import finetune, load_clinic

    data = load_clinic(
        "clinic/photos", "clinic/cases.csv",
        column_map={"image": "file", "label": "diagnosis", "age": "age", "sex": "gender", "site": "body_site",
                    "group_id": "patient"},
        label_map={"naevus": "nv", "melanoma": "mel", "other": ["akiec", "bcc", "bkl", "df", "vasc"]},
        site_map={"upper arm": "upper extremity"},
    )
    model, report = finetune("checkpoints/skin-dualnet-small", data, "runs/clinic", freeze_encoders=True,
                             test_size=0.2)
    report["before"], report["after"], report["before_test"], report["after_test"]

`load_clinic` reads the folder + CSV (`ClinicData`); `finetune` does everything the command line does
(`FinetuneArguments` lists the options; any of them is a keyword argument) and returns the fine-tuned `SkinDualNet`
and the report that is also written to `output_dir/metrics.json`:

1. a lesion- (or patient-) grouped split of the clinic's images, stratified by class (`val_size`, `test_size`);
2. "before": the checkpoint as it is on the validation (and test) images, its classes collapsed onto the clinic's
   (`collapse_probabilities`);
3. the model to fine-tune (`build_model`): the checkpoint itself when the classes match, else a new head whose rows
   start from the mapped classes of the old one (their calibration folded in);
4. with `freeze_encoders`, the frozen part (the segmenter's masks and both trunks) runs once for `cached_views`
   augmented views and the rest trains on that cache (`feature_cache`, `WHOLE_TRUNK`); large images are decoded
   and shrunk once (`working_copies`);
5. model selection counts the starting model as "epoch 0": an epoch is kept only if it beats it on the clinic's
   validation balanced accuracy, else the starting model is saved (`report["kept_starting_model"]`);
6. recalibration for the clinic (`calibration.recalibrate`): temperature and logit bias, the referral threshold and
   the out-of-distribution gate refitted on the clinic's own split, stated in the model card;
7. "after" (validation) and, with a test split, "before_test" / "after_test" on images that chose nothing.
"""

import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from huggingface_hub import ModelCard

from modeling_skinlesion import SkinDualNet, SkinLesionMetadataProcessor
from modeling_skinlesion.configuration_skinlesion import MALIGNANT_LABELS
from modeling_skinlesion.data import column_values
from modeling_skinlesion.data import load_clinic as load_clinic_dataset
from modeling_skinlesion.model_card import load_metrics, training_datasets

from .arguments import FinetuneArguments

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# The clinic's data
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ClinicData:
    """A clinic's labelled images in this package's schema (`dataset`) and how its vocabulary maps onto a checkpoint's:
    `label_map` (clinic class → checkpoint classes; a same-named class maps to itself by default), `site_map` /
    `sex_map` (clinic spelling → the model's vocabulary). `images` / `csv` / `column_map` record where it came from."""

    dataset: datasets.Dataset
    label_map: dict[str, list[str]] = field(default_factory=dict)
    site_map: dict[str, str] = field(default_factory=dict)
    sex_map: dict[str, str] = field(default_factory=dict)
    source: str = "clinic"
    images: str = ""
    csv: str = ""
    column_map: dict[str, str] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        from modeling_skinlesion.data import label_names

        return label_names(self.dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        counts = Counter(column_values(self.dataset, "label"))
        classes = ", ".join(f"{name} {counts.get(i, 0)}" for i, name in enumerate(self.labels))
        return f"ClinicData({self.source!r}: {len(self)} images; {classes})"


def load_clinic(
    images: str | Path,
    csv: str | Path,
    column_map: Mapping[str, str],
    label_map: Mapping[str, str | Sequence[str]] | None = None,
    site_map: Mapping[str, str] | None = None,
    sex_map: Mapping[str, str] | None = None,
    labels: Sequence[str] | None = None,
    masks_dir: str | Path | None = None,
    source: str = "clinic",
) -> ClinicData:
    """A clinic's folder of images plus its CSV (one row per image), ready for `finetune`.

    Args:
        images: the image folder; the CSV's image column holds paths relative to it (with or without extension).
        csv: the CSV file.
        column_map: our field → the CSV's column: `image` and `label` are required; `age`, `sex`, `site`,
            `group_id` (patient or lesion: the split unit) and `mask` are optional (see
            `modeling_skinlesion.data.load_clinic`).
        label_map: clinic class → the checkpoint class (or list of classes) it stands for, e.g.
            `{"naevus": "nv", "other": ["akiec", "bcc"]}`; classes named like a checkpoint class need no entry.
        site_map, sex_map: the clinic's spellings → the model's vocabulary, e.g. `{"upper arm": "upper extremity"}`
            (checked against the checkpoint's vocabulary by `finetune`, and saved in the fine-tuned config).
        labels: the clinic's classes in this order (default: sorted names).
        masks_dir: folder the mask column is relative to (default: `images`).
        source: the data's name in the report and the model card.

    Rows without a label are dropped (logged); a listed image that is missing is dropped with a warning naming it.
    """
    from .loop import keep_labelled

    if "label" not in (column_map or {}):
        raise ValueError(
            "`column_map` must map `label` to the CSV column holding the diagnosis, e.g. label=diagnosis."
        )
    dataset = load_clinic_dataset(
        images, csv, dict(column_map), label_names=list(labels) if labels else None, masks_dir=masks_dir, source=source
    )
    normalised = {
        str(key): [value] if isinstance(value, str) else [str(v) for v in value]
        for key, value in (label_map or {}).items()
    }
    return ClinicData(
        dataset=keep_labelled(dataset),
        label_map=normalised,
        site_map={str(k): str(v) for k, v in (site_map or {}).items()},
        sex_map={str(k): str(v) for k, v in (sex_map or {}).items()},
        source=source,
        images=str(images),
        csv=str(csv),
        column_map=dict(column_map),
    )


def clinic_from_arguments(args: FinetuneArguments) -> ClinicData:
    """`load_clinic` with the command line's options (`--images`, `--csv`, `--column-map`, `--label-map`, ...)."""
    label_map = {
        key: [t.strip() for t in value.split(",") if t.strip()] for key, value in pairs(args.label_map).items()
    }
    return load_clinic(
        args.images,
        args.csv,
        pairs(args.column_map),
        label_map=label_map,
        site_map=pairs(args.site_map),
        sex_map=pairs(args.sex_map),
        labels=args.labels or None,
        masks_dir=args.masks_dir,
        source=args.source_name,
    )


def pairs(entries: Sequence[str]) -> dict[str, str]:
    """KEY=VALUE entries → a dict (keys and values stripped)."""
    return {key.strip(): value.strip() for key, value in (entry.split("=", 1) for entry in entries)}


def working_copies(
    dataset: datasets.Dataset, shorter_side: int, folder: Path, name: str = "images"
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Decode every image of `dataset` once and write a copy whose shorter side is `shorter_side` (PNG, in `folder`;
    images already that small, or smaller, are used as they are); the returned dataset points at the copies. A copy
    already written (a resumed run) is reused. Unreadable files are left to the file check, which reports them."""
    from PIL import Image as PILImage

    from modeling_skinlesion.data.files import _decode, _file_name

    folder.mkdir(parents=True, exist_ok=True)
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    paths, counts = [], Counter()
    for row in raw.select_columns(["image", "image_id"]):
        value = row["image"]
        target = folder / f"{row['image_id']}.png"
        if target.is_file():
            paths.append(str(target))
            counts["reused"] += 1
            continue
        try:
            image = _decode(value, _file_name(value, row["image_id"]), draft_size=(shorter_side, shorter_side))
        except ValueError:
            paths.append(value.get("path") or value)  # the file check reports it by name
            counts["unreadable"] += 1
            continue
        scale = shorter_side / min(image.size)
        if scale >= 1 and value.get("path"):
            paths.append(value["path"])
            counts["kept"] += 1
            continue
        if scale < 1:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.convert("RGB").resize(size, PILImage.Resampling.LANCZOS)
        partial = target.with_suffix(".partial.png")
        image.convert("RGB").save(partial, optimize=False, compress_level=1)
        partial.replace(target)
        paths.append(str(target))
        counts["shrunk"] += 1
    logger.info(f"{name}: {dict(counts)} (working copies, shorter side {shorter_side} px, in {folder})")
    updated = dataset.remove_columns("image").add_column("image", paths).cast_column("image", datasets.Image())
    return updated.select_columns(dataset.column_names), dict(counts)


# --------------------------------------------------------------------------------------------------------------------
# Labels and metadata
# --------------------------------------------------------------------------------------------------------------------
def resolve_label_map(
    clinic: list[str], checkpoint: list[str], label_map: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """Clinic class → the checkpoint classes it stands for: `label_map`'s entries over the default of same-named
    classes mapping to each other."""
    mapping = {name: [name] for name in clinic if name in checkpoint}
    for key, value in label_map.items():
        targets = [value] if isinstance(value, str) else list(value)
        if key not in clinic:
            raise ValueError(
                f"The label map (--label-map) names the clinic class {key!r}, but the clinic's classes are {clinic}."
            )
        unknown = [t for t in targets if t not in checkpoint]
        if unknown or not targets:
            raise ValueError(
                f"The label map (--label-map) entry {key}={','.join(targets)}: {unknown or targets!r} are not classes "
                f"of the checkpoint; its classes are {checkpoint}."
            )
        mapping[key] = targets
    used = Counter(t for targets in mapping.values() for t in targets)
    twice = sorted(t for t, n in used.items() if n > 1)
    if twice:
        raise ValueError(
            f"The label map (--label-map) assigns the checkpoint classes {twice} to several clinic classes."
        )
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


def extend_synonyms(config, site_map: Mapping[str, str], sex_map: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Add the clinic's site/sex spellings to the config's synonyms (checked against its vocabularies)."""
    added = {}
    for field_name, mapping, vocab in (("site", site_map, config.site_vocab), ("sex", sex_map, config.sex_vocab)):
        new = {str(key).strip(): str(value).strip() for key, value in mapping.items()}
        unknown = {key: value for key, value in new.items() if value not in vocab}
        if unknown:
            raise ValueError(
                f"The {field_name} map (--{field_name}-map) targets {unknown}, which are not in the model's "
                f"{field_name} vocabulary {vocab}."
            )
        synonyms = dict(getattr(config, f"{field_name}_synonyms"))
        synonyms.update(new)
        setattr(config, f"{field_name}_synonyms", synonyms)
        added[field_name] = new
    return added


def metadata_report(dataset, metadata: SkinLesionMetadataProcessor) -> dict[str, Any]:
    """How the clinic's age/sex/site values map onto the model's vocabularies: recognised, missing, and unknown values
    (treated as missing) with their counts."""
    columns = {name: column_values(dataset, name) for name in ("age", "sex", "site")}
    report: dict[str, Any] = {}
    for name in ("sex", "site"):
        recognised, missing, unknown = Counter(), 0, Counter()
        for raw in columns[name]:
            if raw is None:
                missing += 1
                continue
            parsed = metadata.normalize_record({name: raw})[name]
            if parsed is None:
                unknown[raw] += 1
            else:
                recognised[parsed] += 1
        report[name] = {"recognised": dict(recognised), "missing": missing, "unknown_as_missing": dict(unknown)}
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
    """The model to fine-tune, and as it is before the first step "epoch 0" of the model selection.

    - Same classes as the checkpoint: the checkpoint itself, its logit bias and temperature kept (so epoch 0 is the
      checkpoint as it is; `calibration.recalibrate` refits both on the clinic's split after training), its loss's
      logit adjustment dropped and the clinic's class weights set.
    - Other classes: the checkpoint with a new head for the clinic's classes. A clinic class mapped to one checkpoint
      class starts from that class's row with the old logit bias and temperature folded in, so with one-to-one maps
      epoch 0 gives exactly the "before" probabilities (renormalised over the mapped classes). A class mapped to
      several starts from their mean row with the log-sum-exp of their biases (an approximation); an unmapped one
      from a fresh row. The new head is uncalibrated (temperature 1, no bias).

    The out-of-distribution gate and the referral point were fitted on the checkpoint's data: with the same classes
    they are kept and marked inherited until `calibration.recalibrate` refits them; a new head drops them (the
    gate's class means and the malignant classes belong to the old classes)."""
    checkpoint_labels = [base.config.id2label[i] for i in range(base.config.num_labels)]
    if clinic == checkpoint_labels:
        base.config.class_weights = weights
        base.config.logit_adjustment = None
        if base.config.ood_feature is not None:
            base.config.ood_fitted_on = f"inherited from {checkpoint}, not refitted: {base.config.ood_fitted_on}"
        if base.config.referral_threshold is not None:
            base.config.referral_fitted_on = (
                f"inherited from {checkpoint}, not refitted (before fine-tuning and recalibration): "
                f"{base.config.referral_fitted_on}"
            )
        return base
    new_config = {"logit_bias": None, "logit_adjustment": None, "temperature": 1.0}
    new_config.update(ood_feature=None, ood_threshold=None, ood_fitted_on=None, referral_threshold=None)
    # A clinic class is malignant when it is named as one, or when every checkpoint class it stands for is.
    base_malignant = set(base.config.malignant_labels or MALIGNANT_LABELS)
    malignant = [
        name
        for name in clinic
        if name in MALIGNANT_LABELS or (mapping.get(name) and all(t in base_malignant for t in mapping[name]))
    ]
    new_config.update(malignant_labels=malignant, referral_fitted_on=None)
    model = SkinDualNet.from_pretrained(
        checkpoint,
        id2label=dict(enumerate(clinic)),
        label2id={name: i for i, name in enumerate(clinic)},
        class_weights=weights,
        ignore_mismatched_sizes=True,
        **new_config,
    )
    old_head, new_head = base.classifier[-1], model.classifier[-1]
    temperature = float(base.config.temperature or 1.0)
    old_bias = old_head.bias.detach().clone()
    if base.config.logit_bias is not None:
        old_bias += old_bias.new_tensor(base.config.logit_bias)
    with torch.no_grad():
        for j, name in enumerate(clinic):
            sources = [checkpoint_labels.index(target) for target in mapping.get(name, [])]
            if not sources:
                continue
            new_head.weight[j] = old_head.weight[sources].mean(0) / temperature
            new_head.bias[j] = torch.logsumexp(old_bias[sources] / temperature, 0)
    return model


# --------------------------------------------------------------------------------------------------------------------
# The fine-tuning run
# --------------------------------------------------------------------------------------------------------------------
def finetune(
    checkpoint: str | Path,
    data: ClinicData,
    output_dir: str | Path,
    *,
    args: FinetuneArguments | None = None,
    **options: Any,
) -> tuple[SkinDualNet, dict[str, Any]]:
    """Fine-tune the `SkinDualNet` at `checkpoint` (a folder or a Hub id) on a clinic's `data` (`load_clinic`) and save
    it with its processor, metrics.json, splits.json and a model card in `output_dir`.

    `options` are the fields of `FinetuneArguments` (the command line's options, snake_case): e.g. `epochs=5`,
    `freeze_encoders=True`, `val_size=0.2`, `test_size=0.2`, `cached_views=3`, `recalibrate=True`, `lr=1e-4`,
    `resume="latest"`. Returns the fine-tuned model (the best epoch, or the starting model when no epoch beat it, on
    the CPU or the accelerator's device) and the report written to `output_dir/metrics.json`: `before` / `after`
    (validation), `before_test` / `after_test` (with `test_size`), `kept_starting_model`, `calibration`, `split`,
    `history`, `wall_time_s`.
    """
    if args is None:
        names = {item.name for item in dataclasses.fields(FinetuneArguments)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(
                f"finetune() got unknown options {unknown}; the options are the fields of FinetuneArguments."
            )
        args = FinetuneArguments(
            checkpoint=str(checkpoint),
            images=data.images,
            csv=data.csv,
            column_map=[f"{k}={v}" for k, v in data.column_map.items()] or ["image=image", "label=label"],
            output_dir=str(output_dir),
            source_name=data.source,
            **options,
        )
        for cls in reversed(type(args).__mro__):  # the command line's checks, as ValueErrors
            check = cls.__dict__.get("check")
            if check is not None:
                check(args)
    elif options:
        raise TypeError("Pass either `args` or keyword options, not both.")
    return _run(args, data)


def _run(args: FinetuneArguments, data: ClinicData) -> tuple[SkinDualNet, dict[str, Any]]:
    from transformers import AutoConfig

    from modeling_skinlesion import SkinLesionImageProcessor
    from modeling_skinlesion.data import (
        SkinLesionTransform,
        balanced_class_weights,
        build_dataloader,
        label_names,
        validate_files,
    )

    from . import evaluation as E
    from . import feature_cache as FC
    from . import loop as T
    from .calibration import recalibrate

    output_dir = Path(args.output_dir)
    timer = T.Timer()
    accelerator = T.start_accelerator(args, output_dir)

    # Checkpoint and the clinic's data: labels mapped, metadata spellings mapped, grouped split -----------------------
    config = AutoConfig.from_pretrained(args.checkpoint)
    if config.model_type != "skin_dualnet":
        raise ValueError(f"The checkpoint {args.checkpoint} is a {config.model_type!r} model, not a SkinDualNet.")
    base = SkinDualNet.from_pretrained(args.checkpoint)
    checkpoint_labels = [base.config.id2label[i] for i in range(base.config.num_labels)]
    try:
        processor = SkinLesionImageProcessor.from_pretrained(args.checkpoint)
    except OSError:
        processor = SkinLesionImageProcessor.from_model_config(base.config)
    size = processor.size["height"], processor.size["width"]
    with accelerator.main_process_first():
        splits, bad_files = T.prepare_splits(args, data.dataset, stratify_column="label", require_masks=False)
        if "test" in splits and len(splits["test"]) and args.bad_files != "unchecked":
            splits["test"], summary = validate_files(
                splits["test"], on_error=args.bad_files, check_masks=True, require_masks=False
            )
            bad_files["test"] = summary.to_dict()
        # Decoded and shrunk once: the views, the epochs and the calibration read the small copies.
        copies = {}
        if args.working_size:
            for name in ("train", "validation"):
                splits[name], copies[name] = working_copies(
                    splits[name], args.working_size * max(size), output_dir / "working-images", name
                )
    clinic = label_names(data.dataset)
    mapping = resolve_label_map(clinic, checkpoint_labels, data.label_map)
    synonyms = extend_synonyms(base.config, data.site_map, data.sex_map)
    metadata = SkinLesionMetadataProcessor.from_config(base.config)
    report = metadata_report(data.dataset, metadata)
    for name in ("sex", "site"):
        if report[name]["unknown_as_missing"]:
            logger.warning(
                f"{name}: values the model does not know, treated as missing (map them with --{name}-map / "
                f"{name}_map=): {report[name]['unknown_as_missing']}"
            )
    logger.info(f"Clinic classes {clinic}; checkpoint classes {checkpoint_labels}; label map {mapping}")
    split_summary = T.describe_split(splits)
    logger.info(f"Split: {split_summary}")
    if accelerator.is_main_process:
        T.write_split_ids(output_dir / "splits.json", splits, args, [data.source], [data.images])
    weights = balanced_class_weights(splits["train"]) if args.class_weights == "balanced" else None

    train_transform = SkinLesionTransform(processor, train=True, metadata_processor=metadata, seed=args.seed)
    eval_transform = SkinLesionTransform(processor, train=False, metadata_processor=metadata)
    use_ground_truth = {True: args.train_masks == "ground_truth", False: args.eval_masks == "ground_truth"}
    eval_batch_size = args.eval_batch_size or 2 * args.batch_size
    has_test = "test" in splits and len(splits["test"]) > 0

    def image_forward(model, batch, labels=False):
        return E.image_forward(model, batch, use_ground_truth[labels], labels)

    def score(model, split: str, labels: list[str], collapse: bool) -> dict[str, Any]:
        """The model's ordinary forward (its own masks, as at inference) on a split's images."""
        loader = accelerator.prepare(build_dataloader(splits[split], eval_transform, eval_batch_size))
        logits, targets = E.predict_logits(model, loader, accelerator, image_forward)
        probabilities = torch.from_numpy(logits).softmax(-1).double().numpy()
        if collapse:
            probabilities = collapse_probabilities(probabilities, checkpoint_labels, clinic, mapping)
        return E.classification_metrics(probabilities, targets, clinic)

    # Before: the checkpoint as it is, its classes collapsed onto the clinic's ---------------------------------------
    base.to(accelerator.device)
    before = score(base, "validation", checkpoint_labels, collapse=True)
    before["unmapped_classes"] = [name for name in clinic if name not in mapping]
    logger.info(f"Before fine-tuning (validation): {T.format_metrics(before, E.CLASSIFICATION_SCORES)}")
    before_test = score(base, "test", checkpoint_labels, collapse=True) if has_test else None
    if before_test is not None:
        logger.info(f"Before fine-tuning (test): {T.format_metrics(before_test, E.CLASSIFICATION_SCORES)}")

    # The model to fine-tune: new head if the classes differ, the clinic's synonyms, frozen parts ---------------------
    model = build_model(args.checkpoint, base, clinic, mapping, weights)
    model.config.site_synonyms, model.config.sex_synonyms = base.config.site_synonyms, base.config.sex_synonyms
    if args.malignant_labels:
        unknown = sorted(set(args.malignant_labels) - set(clinic))
        if unknown:
            raise ValueError(f"malignant_labels {unknown} are not classes of the clinic; its classes are {clinic}.")
        model.config.malignant_labels = list(args.malignant_labels)
    del base
    model.segmenter.requires_grad_(False)
    frozen = [model.image_encoder, model.lesion_encoder] if args.freeze_encoders else []
    frozen = tuple(encoder for encoder in frozen if encoder is not None)
    for encoder in frozen:
        encoder.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"Trainable parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")

    # Inputs: with frozen encoders, the cached outputs of the frozen part; else the images --------------------------
    loaders, train_model, cached = None, model, bool(args.freeze_encoders and args.cache_features)
    if cached:
        loaders = FC.cached_dataloaders(
            accelerator, args, model, splits, train_transform, eval_transform, output_dir, FC.WHOLE_TRUNK
        )
        train_model = FC.SkinDualNetFromFeatures(model, FC.WHOLE_TRUNK)
        first = FC.collate([loaders[0].dataset[0]])
        blank = {key: torch.zeros_like(value) for key, value in first.items() if isinstance(value, torch.Tensor)}

        def forward(model, batch, labels=False):
            return E.feature_forward(model, T.move_to(batch, accelerator.device), labels)

        def blank_batch() -> dict[str, torch.Tensor]:
            return {key: value.to(accelerator.device) for key, value in blank.items()}

        train_transform = loaders[0].dataset  # train_loop's set_epoch selects the cached view
        logger.info(f"Cached the frozen part: {args.cached_views} views of {len(splits['train'])} training images")
    else:
        forward = image_forward

        def blank_batch() -> dict[str, torch.Tensor]:
            return E.blank_image_batch(size, accelerator.device, classifier=True)

    run = T.prepare_run(
        accelerator,
        args,
        train_model,
        splits,
        train_transform,
        eval_transform,
        tracker="skin-dualnet-finetune",
        dataloaders=loaders,
    )
    state = run.state

    # Fine-tune, validate every epoch against the starting model ("epoch 0"), keep the best --------------------------
    T.train_loop(
        accelerator,
        args,
        run,
        timer,
        **E.classifier_task(forward, run.eval_dataloader, accelerator),
        blank_batch=blank_batch,
        frozen=frozen,
        baseline=True,
    )
    kept_starting_model = state.best_epoch == -1
    after = next(r for r in state.history if r["epoch"] == state.best_epoch)["validation"]
    if kept_starting_model:
        logger.info("No epoch beat the starting model on the clinic's validation split: the starting model is kept.")
    logger.info(
        "Validation before -> after fine-tuning: "
        + ", ".join(
            f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in E.CLASSIFICATION_SCORES if before.get(k) is not None
        )
    )

    # Calibrated for the clinic: temperature, bias, referral point, gate ---------------------------------------------
    model = accelerator.unwrap_model(run.model)
    model = getattr(model, "model", model)  # the cached-features wrapper holds the SkinDualNet
    model.eval()
    calibration = None
    if args.recalibrate:
        E.broadcast_buffers(accelerator, model)
        calibration = recalibrate(
            model, splits, eval_transform, accelerator, eval_batch_size, data.source, args.checkpoint,
            tune_logit_bias=True, referral_sensitivity=args.referral_sensitivity,
            ood_accept_rate=args.ood_accept_rate,
        )  # fmt: skip
        after_calibrated = score(model, "validation", clinic, collapse=False)
        calibration["validation_after_recalibration"] = after_calibrated
    after_test = score(model, "test", clinic, collapse=False) if has_test else None
    if after_test is not None:
        logger.info(
            "Test before -> after fine-tuning: "
            + ", ".join(
                f"{k} {before_test[k]:.4f} -> {after_test[k]:.4f}"
                for k in E.CLASSIFICATION_SCORES
                if before_test.get(k) is not None
            )
        )

    # Save the model with its processor, the report and a model card ------------------------------------------------
    trained_on = base_training_sets(args.checkpoint) + [data.source]
    result = T.run_record(
        accelerator,
        args,
        state,
        timer,
        task="classification",
        base_model=args.checkpoint,
        eval_dataset=data.source,
        labels=clinic,
        checkpoint_labels=checkpoint_labels,
        label_map=mapping,
        new_head=clinic != checkpoint_labels,
        freeze_encoders=args.freeze_encoders,
        cached_features={"views": args.cached_views} if cached else None,
        working_copies=copies or None,
        trainable_parameters=trainable,
        metadata={"added_synonyms": synonyms, **report},
        kept_starting_model=kept_starting_model,
        before=before,
        after=after,
        before_test=before_test,
        after_test=after_test,
        calibration=calibration,
        split=split_summary,
        bad_files=bad_files,
    )
    result["args"]["dataset"] = trained_on  # the card's training sets: the checkpoint's, then the clinic's
    training = T.training_facts(args, result)
    if calibration is not None:
        training["recalibrated for the clinic"] = calibration["summary"]
    T.save_run(
        accelerator,
        output_dir,
        model,
        processor,
        result,
        repo_id=f"{data.source}/skin-dualnet-finetuned",
        datasets=trained_on,
        base_model=args.checkpoint,
        training=training,
    )
    epoch = "the starting model (epoch 0)" if kept_starting_model else f"epoch {state.best_epoch + 1}"
    logger.info(f"Saved the fine-tuned model ({epoch}) to {output_dir} in {timer.elapsed():.0f} s")
    accelerator.end_training()
    return model, result
