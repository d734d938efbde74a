"""Evaluation shared by the training, fine-tuning, evaluation, calibration and ablation scripts.

- During training (several processes): `validate_segmenter` and `validate_classifier` score the validation split,
  gathered across processes with each image once (`gather_by_index`), after `broadcast_buffers`.
- The classifier's forward on a batch (`image_forward`, lesion masks from the ground truth or the segmenter as
  `lesion_masks` decides; `feature_forward` on the cached features of `--frozen-stages`), its gathered logits
  (`predict_logits`) and the post-hoc calibration stored in its config (`fit_calibration`).
- After training (one process, `scripts/evaluate_model.py` and `scripts/ablation_report.py`): `load_model`,
  `select_split` (the split training made, or a splits.json), `evaluate_segmenter` at the original image size,
  `predict_classifier` with the per-branch Grad-CAM lesion focus, ISIC submission files.
- The metrics: the shipped `evaluate` modules, loaded by path (offline).
"""

import io
import json
import logging
from pathlib import Path
from typing import Any

import datasets
import evaluate
import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import extract_model_from_parallel
from PIL import Image
from transformers import AutoConfig

from modeling_skinlesion import SkinDualNet, SkinLesionImageProcessor, SkinLesionSegmenter
from modeling_skinlesion.data import column_values, label_names, prepare_for_transform
from modeling_skinlesion.image_processing_skinlesion import load_image, to_binary_mask

from .checkpoints import unwrap_pretrained
from .loop import cap, move_to, split_dataset

logger = logging.getLogger(__name__)
SEGMENTATION_SUFFIX = "_segmentation.png"
CLASSIFICATION_SCORES = ("accuracy", "balanced_accuracy", "macro_auc", "ece")
SEGMENTATION_SCORES = ("dice", "jaccard", "thresholded_jaccard", "sensitivity", "specificity")


# --------------------------------------------------------------------------------------------------------------------
# Metrics and gathered predictions
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


# --------------------------------------------------------------------------------------------------------------------
# Validation during training (gathered across processes)
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def validate_segmenter(model, dataloader, accelerator: Accelerator) -> dict[str, float]:
    """Validation Dice & co. over the whole (sharded) dataloader, gathered across processes, each image once.
    Masks are compared at the model's input size, thresholded at the config's `mask_threshold`."""
    broadcast_buffers(accelerator, model)
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
    _, predicted, reference = gather_by_index(accelerator, indices, predictions, references)
    return segmentation_metrics(predicted.astype(bool), reference.astype(bool))


def lesion_masks(model, batch: dict, use_ground_truth: bool) -> torch.Tensor | None:
    """Ground-truth masks where a row has one (if asked), the segmenter's elsewhere; `None` lets the model predict
    them all itself."""
    has_mask = batch["has_mask"]
    if not use_ground_truth or not has_mask.any():
        return None
    if has_mask.all():
        return batch["lesion_mask"]
    predicted = extract_model_from_parallel(model).predict_lesion_mask(batch["pixel_values"])
    return torch.where(has_mask.view(-1, 1, 1, 1), batch["lesion_mask"], predicted)


def image_forward(model, batch: dict, use_ground_truth: bool, labels: bool = False):
    """The classifier on a batch of images (masks as `lesion_masks` decides)."""
    return model(
        pixel_values=batch["pixel_values"],
        age=batch["age"],
        sex_ids=batch["sex_ids"],
        site_ids=batch["site_ids"],
        lesion_mask=lesion_masks(model, batch, use_ground_truth),
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


def blank_image_batch(size: tuple[int, int], device: torch.device, classifier: bool) -> dict[str, torch.Tensor]:
    """A one-image stand-in for a batch whose every image was unreadable (see `loop.train_loop`)."""
    batch = {
        "pixel_values": torch.zeros(1, 3, *size, device=device),
        "lesion_mask": torch.zeros(1, 1, *size, device=device),
    }
    if classifier:
        batch.update(
            has_mask=torch.ones(1, dtype=torch.bool, device=device),
            labels=torch.zeros(1, dtype=torch.long, device=device),
            age=torch.full((1,), float("nan"), device=device),
            sex_ids=torch.zeros(1, dtype=torch.long, device=device),
            site_ids=torch.zeros(1, dtype=torch.long, device=device),
        )
    return batch


@torch.no_grad()
def predict_logits(model, dataloader, accelerator: Accelerator, forward) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over the whole (sharded) dataloader, gathered across processes, each image once.
    `forward(model, batch)` runs the model. Call `broadcast_buffers` first on a model that was trained with DDP."""
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
        num_labels = unwrap_pretrained(accelerator, model).config.num_labels
        logits = [torch.zeros(0, num_labels, device=accelerator.device)]
        labels = [torch.zeros(0, dtype=torch.long, device=accelerator.device)]
    _, logit, label = gather_by_index(accelerator, indices, logits, labels)
    return logit, label


def validate_classifier(model, dataloader, accelerator: Accelerator, forward) -> dict:
    """Validation scores over the whole (sharded) dataloader, gathered across processes, each image once."""
    broadcast_buffers(accelerator, model)
    logits, label = predict_logits(model, dataloader, accelerator, forward)
    config = unwrap_pretrained(accelerator, model).config
    names = [config.id2label[i] for i in range(config.num_labels)]
    return classification_metrics(torch.from_numpy(logits).softmax(-1).numpy(), label, names)


def classifier_task(forward, eval_dataloader, accelerator: Accelerator) -> dict[str, Any]:
    """The classifier's part of `loop.train_loop` (train_classifier.py and finetune.py): the loss of
    `forward(model, batch, labels=True)`, the gathered validation of `validate_classifier`, and the best epoch chosen
    by balanced accuracy."""
    return {
        "compute_loss": lambda model, batch: forward(model, batch, labels=True).loss,
        "evaluate": lambda model: validate_classifier(model, eval_dataloader, accelerator, forward),
        "best_key": "balanced_accuracy",
        "scores": CLASSIFICATION_SCORES,
    }


def fit_calibration(
    config, logits: np.ndarray, labels: np.ndarray, train_counts: list[int], tune_logit_bias: bool, calibrate: bool
) -> dict:
    """Fit on held-out (validation) logits, in this order, and store in `config`: the post-hoc logit adjustment
    `-tau * log(train prior)` with the tau (grid -1..1) of best balanced accuracy (`config.logit_bias`), then the
    temperature of least negative log-likelihood (`config.temperature`). Returns what was fitted and the scores."""
    names = [config.id2label[i] for i in range(config.num_labels)]
    report: dict = {"split": "validation"}
    before = classification_metrics(torch.from_numpy(logits).softmax(-1).numpy(), labels, names)
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
    temperature = fit_temperature(logits, labels) if calibrate else 1.0
    after = classification_metrics(torch.from_numpy(logits / temperature).softmax(-1).numpy(), labels, names)
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


# --------------------------------------------------------------------------------------------------------------------
# Evaluation of a saved model (one process)
# --------------------------------------------------------------------------------------------------------------------
def evaluation_device(name: str | None) -> torch.device:
    """The device of a one-process evaluation: `name` (`--device`) or Accelerate's default (the GPU when there is
    one). Accelerate's state is set up either way: the data helpers log through it."""
    if name is None:
        return PartialState().device
    device = torch.device(name)
    PartialState(cpu=device.type == "cpu")
    return device


def load_model(name: str, device: torch.device) -> tuple[torch.nn.Module, SkinLesionImageProcessor]:
    """The saved segmenter or classifier (by its config's model type) in eval mode, and its image processor."""
    config = AutoConfig.from_pretrained(name)
    classes = {"skinlesion_segmenter": SkinLesionSegmenter, "skin_dualnet": SkinDualNet}
    if config.model_type not in classes:
        raise ValueError(f"{name} is a {config.model_type!r} model; expected one of {sorted(classes)}.")
    model = classes[config.model_type].from_pretrained(name).to(device).eval()
    try:
        processor = SkinLesionImageProcessor.from_pretrained(name)
    except OSError:
        processor = SkinLesionImageProcessor.from_model_config(model.config)
    return model, processor


def model_labels(model: SkinDualNet) -> list[str]:
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def label_remap(dataset: datasets.Dataset, names: list[str]) -> np.ndarray:
    """Dataset class index → model class index, matched by name; a `ValueError` names labels the model lacks."""
    data_names = label_names(dataset)
    present = {data_names[i] for i in set(column_values(dataset, "label")) if i >= 0}
    unknown = sorted(present - set(names))
    if unknown:
        raise ValueError(
            f"The data has labels {unknown} that the model does not predict (its labels: {names}). Fine-tune it on "
            "this label set first (scripts/finetune.py)."
        )
    return np.array([names.index(name) if name in names else -1 for name in data_names], dtype=np.int64)


def select_split(args: Any, dataset: datasets.Dataset, stratify_column: str) -> datasets.Dataset:
    """The rows to evaluate (`args.split` of the split and evaluation options): a training run's recorded ids
    (`args.splits_file`), all rows, or the split training made (`loop.split_dataset`, same options), capped by
    --max-eval-samples as training caps its validation split."""
    if args.splits_file:
        recorded = json.loads(Path(args.splits_file).read_text())
        if args.split not in recorded:
            raise ValueError(f"{args.splits_file} has no {args.split!r} split; it has {sorted(recorded)}.")
        chosen = select_ids(dataset, recorded[args.split], args.splits_file)
    elif args.split == "all":
        chosen = dataset
    else:
        chosen = split_dataset(args, dataset, stratify_column)[args.split]
    chosen = cap(chosen, args.max_eval_samples, args.split_seed)
    if len(chosen) == 0:
        raise ValueError(f"The {args.split!r} split of {args.dataset} is empty.")
    return chosen


def select_ids(dataset: datasets.Dataset, image_ids: list[str], source: str) -> datasets.Dataset:
    """The rows of `dataset` whose image id is in `image_ids` (read from `source`), in the dataset's order."""
    wanted = set(image_ids)
    chosen = dataset.select([i for i, image_id in enumerate(column_values(dataset, "image_id")) if image_id in wanted])
    if len(chosen) < len(wanted):
        logger.warning(f"{len(wanted) - len(chosen)} ids of {source} are not in the data given.")
    return chosen


def open_file(value: Any, name: str) -> Image.Image:
    """An undecoded `datasets.Image` value (path or bytes) as a PIL image; a `ValueError` names the file."""
    if value is None:
        raise ValueError(f"{name}: no file")
    if value.get("bytes") is not None:
        return load_image(io.BytesIO(value["bytes"]), name=value.get("path") or name)
    return load_image(value["path"], name=value["path"])


@torch.no_grad()
def evaluate_segmenter(
    model: SkinLesionSegmenter,
    processor: SkinLesionImageProcessor,
    dataset: datasets.Dataset,
    batch_size: int,
    device: torch.device,
    mask_cleanup: bool = True,
    submission_dir: Path | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Scores at the size of each reference mask (the original image size), after `post_process_masks` (largest
    component and filled holes unless `mask_cleanup` is off); with `submission_dir`, one ISIC submission PNG per image.
    Returns (metrics, names of the images that could not be read)."""
    scorer = metric("lesion_segmentation")
    rows = prepare_for_transform(dataset.select_columns(["image", "mask", "image_id"]))
    dropped = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        images, references, ids = [], [], []
        for image, mask, image_id in zip(batch["image"], batch["mask"], batch["image_id"]):
            try:
                opened = open_file(image, image_id)
                reference = to_binary_mask(open_file(mask, f"{image_id} mask"), f"mask of {image_id}")
            except ValueError as error:
                logger.warning(f"Skipping {image_id}: {error}")
                dropped.append(image_id)
                continue
            images.append(opened)
            references.append(reference)
            ids.append(image_id)
        if not images:
            continue
        logits = model(pixel_values=processor(images)["pixel_values"].to(device)).logits
        predictions = processor.post_process_masks(
            logits, target_sizes=[r.shape for r in references], largest_component=mask_cleanup, fill_holes=mask_cleanup
        )
        scorer.add_batch(predictions=predictions, references=references)
        if submission_dir is not None:
            for image_id, prediction in zip(ids, predictions):
                Image.fromarray(prediction.astype(np.uint8) * 255, mode="L").save(
                    submission_dir / f"{image_id}{SEGMENTATION_SUFFIX}"
                )
    if len(dropped) == len(rows):
        raise ValueError("No image of the split could be read.")
    return scorer.compute(), dropped


def lesion_focus_scores(model: SkinDualNet, inputs: dict[str, torch.Tensor], reference_masks: torch.Tensor) -> dict:
    """The per-branch Grad-CAM "lesion focus": for each image and each encoder branch, the share of the Grad-CAM
    heatmap (of the predicted class) that falls on the lesion, at the processed input's size.

    `reference_masks` `(batch_size, 1, height, width)` are the lesion masks to score against. The lesion branch's
    heatmap is placed back into the box its lesion image was cut from. Returns `{branch: [focus per image]}` (NaN for
    an all-zero heatmap). Uses the fast Grad-CAM of `explaining_skinlesion`.
    """
    from modeling_skinlesion.explaining_skinlesion import SkinDualNetGradCAM, heatmap_to_image, lesion_focus

    explanation = SkinDualNetGradCAM()(model, **inputs)
    size = tuple(inputs["pixel_values"].shape[-2:])
    boxes = explanation.outputs.lesion_boxes
    scores: dict[str, list[float]] = {}
    for branch, heatmaps in explanation.heatmaps.items():
        scores[branch] = []
        for i, heatmap in enumerate(heatmaps):
            box = boxes[i] if branch == "lesion" and boxes is not None else None
            placed = heatmap_to_image(heatmap, size, box=box, input_size=size if box is not None else None)
            scores[branch].append(lesion_focus(placed, reference_masks[i, 0] > 0.5))
    return scores


def predict_classifier(
    model: SkinDualNet,
    dataloader: torch.utils.data.DataLoader,
    device: torch.device,
    use_ground_truth_masks: bool = False,
    focus_limit: int = 0,
    drop_metadata: bool = False,
) -> dict[str, Any]:
    """Run the classifier over `dataloader`: probabilities `(n, num_labels)`, dataset labels, image ids, the names of
    unreadable images, and the per-branch lesion focus of the first `focus_limit` images (against the ground-truth
    mask where the data has one, else the mask the model used). `drop_metadata` withholds age, sex and site."""
    probabilities, labels, ids, dropped = [], [], [], []
    focus_scores: dict[str, list[float]] = {}
    for batch in dataloader:
        dropped += batch["dropped"]
        if batch["pixel_values"].shape[0] == 0:
            continue
        batch = move_to(batch, device)
        inputs = {key: batch[key] for key in ("pixel_values", "age", "sex_ids", "site_ids")}
        if drop_metadata:
            inputs.update(
                age=torch.full_like(inputs["age"], float("nan")),
                sex_ids=torch.zeros_like(inputs["sex_ids"]),
                site_ids=torch.zeros_like(inputs["site_ids"]),
            )
        inputs["lesion_mask"] = lesion_masks(model, batch, use_ground_truth_masks)
        with torch.no_grad():
            outputs = model(**inputs)
        probabilities.append(outputs.logits.float().softmax(-1).cpu())
        labels.append(batch["labels"].cpu())
        ids += batch["image_id"]
        remaining = focus_limit - len(next(iter(focus_scores.values()), []))
        if remaining > 0:
            part = {key: value[:remaining] for key, value in inputs.items() if value is not None}
            has_mask = batch["has_mask"][:remaining].view(-1, 1, 1, 1)
            reference = batch["lesion_mask"][:remaining]
            if not bool(has_mask.all()):
                if outputs.lesion_mask is None:
                    raise ValueError("Lesion focus without a lesion branch needs a ground-truth mask for every image.")
                reference = torch.where(has_mask, reference, outputs.lesion_mask[:remaining])
            for branch, values in lesion_focus_scores(model, part, reference).items():
                focus_scores.setdefault(branch, []).extend(values)
            # What a uniform heatmap would score on the image branch: the lesion's share of the image.
            focus_scores.setdefault("chance", []).extend((reference > 0.5).float().flatten(1).mean(1).tolist())
    if not ids:
        raise ValueError("No image of the split could be read.")
    return {
        "probabilities": torch.cat(probabilities).double().numpy(),
        "labels": torch.cat(labels).numpy(),
        "image_ids": ids,
        "dropped": dropped,
        "lesion_focus": focus_scores,
    }


def write_classification_submission(path: Path, image_ids: list[str], probabilities: np.ndarray, names: list[str]):
    """The ISIC classification format: `image` plus one probability column per class."""
    table = pd.DataFrame(probabilities, columns=names)
    table.insert(0, "image", image_ids)
    table.to_csv(path, index=False)
