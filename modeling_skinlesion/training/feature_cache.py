"""Cheap CPU epochs on cached frozen-trunk features: `train_classifier.py --frozen-stages K`, and fine-tuning with
frozen encoders (`finetuning.finetune(..., freeze_encoders=True)`, `WHOLE_TRUNK`: the trunks' whole output is cached).

The stem and the first K stages (`blocks[:K]`) of both classifier trunks stay frozen at their ImageNet weights. Their
outputs are computed once, for `--cached-views` augmented views of every training image (view `v` is the training
transform of epoch `v`, lesion image from the same mask path as the forward) and for the validation images (no
augmentation, lesion image from the segmenter's mask as at inference), and kept in memory (and in
`output_dir/feature-cache/`, so a resumed run does not recompute them). Every epoch then runs only the trainable rest
of the network: `blocks[K:]`, the trunk's head convolution, the token projection, the fusion, the metadata
transformer and the classifier. Epoch `e` reads view `e % views`, with a random flip / 90° turn of the cached feature
maps on top. The frozen part runs in eval mode (its BatchNorm statistics are the ImageNet ones), exactly as in the
full model at inference, so the saved model gives the same logits as the cached path (tested).

Only EfficientNet/MobileNet-family timm trunks (`conv_stem`, `bn1`, `blocks`, `conv_head`, `bn2`) can be split after
K stages; other trunks are refused with a clear error. `frozen_stages=WHOLE_TRUNK` caches `forward_features` of any
timm trunk (DenseNet included): then only the token projection on, which the caller keeps frozen or not, runs per
epoch.
"""

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

STAGE_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")
WHOLE_TRUNK = -1  # `frozen_stages` value: the whole trunk is frozen and its last feature map cached
CACHE_KEYS = ("image_features", "lesion_features", "age", "sex_ids", "site_ids", "labels", "index")


def check_trunk(trunk: nn.Module, frozen_stages: int, name: str) -> None:
    """Raise a `ValueError` unless `trunk` can be split after `frozen_stages` stages."""
    missing = [part for part in STAGE_PARTS if not hasattr(trunk, part)]
    if missing:
        raise ValueError(
            f"--frozen-stages needs an EfficientNet/MobileNet-family timm trunk ({', '.join(STAGE_PARTS)}); "
            f"{name} ({type(trunk).__name__}) lacks {missing}. Train without --frozen-stages."
        )
    if not 0 < frozen_stages < len(trunk.blocks):
        raise ValueError(f"--frozen-stages must lie in [1, {len(trunk.blocks) - 1}] for {name}, got {frozen_stages}.")


def trunks(model: nn.Module) -> dict[str, nn.Module]:
    """The classifier trunks by branch (one entry when the encoders are shared or there is no lesion branch)."""
    found = {"image": model.image_encoder.trunk}
    if model.lesion_encoder is not None:
        found["lesion"] = model.lesion_encoder.trunk
    return found


def freeze_stages(model: nn.Module, frozen_stages: int) -> None:
    """Freeze the stem and `blocks[:frozen_stages]` of every classifier trunk (no gradients, eval mode kept)."""
    for name, trunk in trunks(model).items():
        check_trunk(trunk, frozen_stages, f"the {name} trunk")
        for module in (trunk.conv_stem, trunk.bn1, *trunk.blocks[:frozen_stages]):
            module.requires_grad_(False)


@torch.no_grad()
def frozen_features(trunk: nn.Module, pixel_values: torch.Tensor, frozen_stages: int) -> torch.Tensor:
    """Output of the frozen part (stem + `blocks[:frozen_stages]`, or the whole trunk) in eval mode:
    `(batch_size, channels, h, w)`."""
    was_training = trunk.training
    trunk.eval()
    try:
        if frozen_stages == WHOLE_TRUNK:
            return trunk.forward_features(pixel_values)
        hidden_states = trunk.bn1(trunk.conv_stem(pixel_values))
        for stage in trunk.blocks[:frozen_stages]:
            hidden_states = stage(hidden_states)
    finally:
        trunk.train(was_training)
    return hidden_states


def trainable_features(trunk: nn.Module, hidden_states: torch.Tensor, frozen_stages: int) -> torch.Tensor:
    """The rest of `forward_features` from the frozen part's output: `blocks[frozen_stages:]`, `conv_head`, `bn2`
    (nothing for `WHOLE_TRUNK`)."""
    if frozen_stages == WHOLE_TRUNK:
        return hidden_states
    for stage in trunk.blocks[frozen_stages:]:
        hidden_states = stage(hidden_states)
    return trunk.bn2(trunk.conv_head(hidden_states))


class SkinDualNetFromFeatures(nn.Module):
    """The classifier from cached frozen features on: what `accelerator.prepare` wraps (so DDP still all-reduces
    the gradients) while the script saves `self.model`, the full `SkinDualNet`."""

    def __init__(self, model: nn.Module, frozen_stages: int):
        super().__init__()
        self.model = model
        self.frozen_stages = frozen_stages

    def forward(
        self, image_features: torch.Tensor, lesion_features: torch.Tensor | None = None, **metadata: torch.Tensor
    ):
        """`metadata`: `age`, `sex_ids`, `site_ids` and `labels`, as `SkinDualNet.classify_tokens` takes them."""
        model = self.model
        image_tokens = model.image_encoder.tokens(
            trainable_features(model.image_encoder.trunk, image_features, self.frozen_stages)
        )
        lesion_tokens = None
        if model.config.use_lesion_branch:
            branch = model.lesion_branch
            lesion_tokens = branch.tokens(trainable_features(branch.trunk, lesion_features, self.frozen_stages))
        return model.classify_tokens(image_tokens, lesion_tokens, **metadata)


def _flip(features: torch.Tensor, code: int) -> torch.Tensor:
    """One of 8 dihedral transforms of `(channels, h, w)` feature maps (code 0 = identity)."""
    if code & 1:
        features = features.flip(-1)
    if code & 2:
        features = features.flip(-2)
    if code & 4 and features.shape[-1] == features.shape[-2]:
        features = features.transpose(-1, -2)
    return features


class CachedFeatures(torch.utils.data.Dataset):
    """Cached views of a split. `set_epoch(e)` selects view `e % views`; training items get a random dihedral
    transform of their feature maps drawn from `(seed, epoch, index)`."""

    def __init__(self, views: list[dict[str, torch.Tensor]], train: bool, seed: int = 0):
        if not views:
            raise ValueError("No cached views.")
        self.views = views
        self.train = train
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.views[0]["labels"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        view = self.views[self.epoch % len(self.views)]
        item = {key: view[key][i] for key in CACHE_KEYS if key in view}
        for key in ("image_features", "lesion_features"):
            if key in item:
                item[key] = item[key].float()
        if self.train:
            codes = np.random.default_rng([self.seed, self.epoch, int(item["index"])]).integers(8, size=2)
            item["image_features"] = _flip(item["image_features"], int(codes[0]))
            if "lesion_features" in item:
                item["lesion_features"] = _flip(item["lesion_features"], int(codes[1]))
        item["image_id"] = view["image_id"][i]
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0] if key != "image_id"}
    batch["image_id"] = [item["image_id"] for item in items]
    batch["dropped"] = []
    return batch


@torch.no_grad()
def compute_view(
    model: nn.Module,
    dataloader: Any,
    frozen_stages: int,
    lesion_mask_fn: Any,
    dtype: torch.dtype,
    desc: str,
    disable_progress: bool,
) -> dict[str, Any]:
    """Run the frozen part over one pass of `dataloader` (batches of `SkinLesionTransform`). `lesion_mask_fn(batch)`
    gives the masks for the lesion image (`None`: the segmenter's, through `model.lesion_inputs`)."""
    parts: dict[str, list] = {key: [] for key in (*CACHE_KEYS, "image_id")}
    dropped: list[str] = []
    for batch in tqdm(dataloader, desc=desc, disable=disable_progress):
        dropped.extend(batch.get("dropped", []))
        pixel_values = batch["pixel_values"]
        if pixel_values.shape[0] == 0:
            continue
        parts["image_features"].append(
            frozen_features(model.image_encoder.trunk, pixel_values, frozen_stages).to(dtype).cpu()
        )
        if model.config.use_lesion_branch:
            _, lesion_pixel_values, _, _ = model.lesion_inputs(pixel_values, lesion_mask_fn(batch))
            branch = model.lesion_branch
            parts["lesion_features"].append(
                frozen_features(branch.trunk, lesion_pixel_values, frozen_stages).to(dtype).cpu()
            )
        for key in ("age", "sex_ids", "site_ids", "labels", "index"):
            parts[key].append(batch[key].cpu())
        parts["image_id"].extend(batch["image_id"])
    view = {key: torch.cat(value) for key, value in parts.items() if key != "image_id" and value}
    view["image_id"] = parts["image_id"]
    view["dropped"] = dropped
    return view


def weights_digest(model: nn.Module, frozen_stages: int) -> str:
    """Checksum of every weight the cached views depend on: the frozen trunk parts and the segmenter (its masks build
    the lesion images). Computed once per run."""
    digest = hashlib.sha1()
    if frozen_stages == WHOLE_TRUNK:
        parts = {name: trunk for name, trunk in trunks(model).items()}
    else:
        parts = {f"{name}.{i}": module for name, trunk in trunks(model).items()
                 for i, module in enumerate((trunk.conv_stem, trunk.bn1, *trunk.blocks[:frozen_stages]))}  # fmt: skip
    parts["segmenter"] = model.segmenter
    for name, module in parts.items():
        for tensor in module.state_dict().values():
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def cache_key(weights: str, frozen_stages: int, split_ids: list[str], extra: dict[str, Any]) -> str:
    """Identifies a cache: the weights' digest, the split's images and the settings that shape the views."""
    payload = json.dumps({"ids": split_ids, "frozen_stages": frozen_stages, **extra}, sort_keys=True)
    return hashlib.sha1((weights + payload).encode()).hexdigest()[:16]


def load_or_compute(path: Path, key: str, compute: Any) -> dict[str, Any]:
    """The view stored at `path` when its key matches, else `compute()` (then stored)."""
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=False)
        if stored.get("key") == key:
            logger.info(f"Loaded cached features {path}")
            return stored["view"]
        logger.info(f"Cached features {path} are for other weights/settings; recomputing")
    view = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save({"key": key, "view": view}, partial)
    partial.replace(path)
    return view


class CachedLoader(torch.utils.data.DataLoader):
    """A DataLoader over `CachedFeatures` whose `set_epoch` reshuffles (seeded by `(seed, epoch)`, the same on every
    process and after a resume) and selects the epoch's view. It is already this process's shard: do not pass it
    through `accelerator.prepare`."""

    def __init__(self, dataset: CachedFeatures, batch_size: int, shuffle: bool, seed: int):
        from accelerate.data_loader import SeedableRandomSampler

        sampler = SeedableRandomSampler(dataset, data_seed=seed) if shuffle else None
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def cached_dataloaders(
    accelerator: Any,
    args: Any,
    model: nn.Module,
    splits: Any,
    train_transform: Any,
    eval_transform: Any,
    output_dir: Path,
    frozen_stages: int | None = None,
) -> tuple[CachedLoader, CachedLoader]:
    """The frozen part's outputs for `args.cached_views` training views and the validation split, computed once (or
    read back from `output_dir/feature-cache`), as this process's training and validation loaders. `args` holds
    the training options (cached_views, train_masks, eval_masks, seed, batch sizes, and frozen_stages unless
    `frozen_stages` is given)."""
    from modeling_skinlesion.data import build_dataloader, column_values

    from .evaluation import lesion_masks

    frozen_stages = args.frozen_stages if frozen_stages is None else frozen_stages
    model.to(accelerator.device)
    batch_size = args.eval_batch_size or 2 * args.batch_size
    rank, quiet = accelerator.process_index, not accelerator.is_local_main_process
    cache_dir = output_dir / "feature-cache"
    train_images = accelerator.prepare(build_dataloader(splits["train"], train_transform, batch_size))
    eval_images = accelerator.prepare(build_dataloader(splits["validation"], eval_transform, batch_size))
    settings = {"seed": args.seed, "train_masks": args.train_masks, "size": model.config.image_size}
    weights = weights_digest(model, frozen_stages)

    def compute(images: Any, ground_truth: bool, dtype: torch.dtype, description: str) -> dict[str, torch.Tensor]:
        masks = lambda batch: lesion_masks(model, batch, ground_truth)  # noqa: E731
        return compute_view(model, images, frozen_stages, masks, dtype, description, quiet)

    train_ids = column_values(splits["train"], "image_id")
    views = []
    for view in range(args.cached_views):
        train_transform.set_epoch(view)
        key = cache_key(weights, frozen_stages, train_ids, {**settings, "view": view})
        description = f"cache train view {view + 1}/{args.cached_views}"
        views.append(
            load_or_compute(
                cache_dir / f"train-view{view}-rank{rank}.pt",
                key,
                lambda description=description: compute(
                    train_images, args.train_masks == "ground_truth", torch.float16, description
                ),
            )
        )
    train_transform.set_epoch(0)
    eval_ids = column_values(splits["validation"], "image_id")
    key = cache_key(weights, frozen_stages, eval_ids, {"eval_masks": args.eval_masks})
    eval_view = load_or_compute(
        cache_dir / f"validation-rank{rank}.pt",
        key,
        lambda: compute(eval_images, args.eval_masks == "ground_truth", torch.float32, "cache validation"),
    )
    train = CachedLoader(CachedFeatures(views, train=True, seed=args.seed), args.batch_size, True, args.seed)
    return train, CachedLoader(CachedFeatures([eval_view], train=False), batch_size, False, args.seed)
