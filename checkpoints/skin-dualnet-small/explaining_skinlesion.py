"""Fast Grad-CAM for skin-dualnet, heatmap placement at the original image size and the lesion-focus score.

The fast path needs one classification forward and one backward that stops at the hooked activations: forward hooks
keep the activation of the Grad-CAM layer of each encoder as an autograd leaf, autograd records nothing above it
(each encoder runs with gradients off up to that layer), and `torch.autograd.grad` differentiates the class score with
respect to those two leaves only, so no parameter gradient is computed and no branch runs twice.

Remote code (the `*_skinlesion.py` rule, see `pipeline_skinlesion`): shipped beside the weights, so it imports only
torch, numpy and the standard library. The pytorch-grad-cam backend (every CAM method of that library, one call
per branch) is package-only: `modeling_skinlesion.grad_cam_backend`; its explainers plug into the pipeline as objects.
Heatmap convention: float32 in [0, 1], 0 = cold, 1 = hot.
"""

import math
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FAST_CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "gradcamelementwise")
BRANCHES = ("image", "lesion")

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@dataclass
class SkinDualNetExplanation:
    r"""
    outputs (`SkinDualNetOutput`):
        The classification output (detached): logits, lesion mask, lesion image, lesion boxes, `mask_empty`, ...
    target_classes (`list[int]`):
        The class explained for each image (the predicted one unless another was asked for).
    heatmaps (`dict[str, torch.Tensor]`):
        Per branch (`"image"`, and `"lesion"` when the model has a lesion branch), float32 maps of shape
        `(batch_size, height, width)` in [0, 1], in the coordinates of that branch's input (the processed image, or the
        lesion image), at the hooked layer's resolution (fast path) or the input resolution (pytorch-grad-cam).
    """

    outputs: Any
    target_classes: list[int]
    heatmaps: dict[str, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# Layers, classes and model state
# --------------------------------------------------------------------------------------------------------------------
def check_dualnet(model: Any, name: str = "model") -> None:
    """Raise a `ValueError` unless `model` (a model, or its config) is a skin-dualnet classifier: the one model-type
    check of the pipeline, the explainers and `save_for_hub`."""
    config = getattr(model, "config", model)
    if getattr(config, "model_type", None) != "skin_dualnet":
        raise ValueError(
            f"`{name}` must be a SkinDualNet (config.model_type 'skin_dualnet'), got {type(model).__name__} "
            f"(model_type {getattr(config, 'model_type', None)!r}); load a classifier with "
            "`AutoModelForImageClassification.from_pretrained(...)`."
        )


@dataclass(frozen=True)
class CamSite:
    """Where Grad-CAM reads one branch: `encoder` (the branch's `SkinDualNetImageEncoder`) and `layer`, the module of
    its timm trunk whose output is the activation."""

    encoder: nn.Module
    layer: nn.Module


def _layer_candidates(trunk: nn.Module) -> list[str]:
    info = getattr(trunk, "feature_info", None) or []
    names = [entry["module"] for entry in info if isinstance(entry, Mapping) and "module" in entry]
    return names or [name for name, _ in trunk.named_children()]


def resolve_cam_sites(model: nn.Module, layer: str | None = None) -> dict[str, CamSite]:
    """Per branch, the `CamSite` of Grad-CAM.

    `layer` (a module name inside each timm trunk) defaults to `model.config.gradcam_target_layer`, then to the
    module of the trunk's last timm `feature_info` entry (`layer4` of a ResNet, `features.norm5` of a DenseNet,
    `blocks.6` of an EfficientNet-Lite0), so no table of layer names is needed. The `"lesion"` entry is absent when
    the model has no lesion branch; with shared encoders both entries hold the same modules.
    """
    check_dualnet(model)
    name = layer or getattr(model.config, "gradcam_target_layer", None)
    encoders = {"image": model.image_encoder}
    if model.lesion_branch is not None:
        encoders["lesion"] = model.lesion_branch
    sites = {}
    for branch, encoder in encoders.items():
        layer_name = name or _layer_candidates(encoder.trunk)[-1]
        try:
            module = encoder.trunk.get_submodule(layer_name)
        except AttributeError as error:
            raise ValueError(
                f"Grad-CAM layer {layer_name!r} is not a module of the {branch} encoder's trunk "
                f"({model.config.encoder_name}); set `gradcam_target_layer` in the config (or pass `layer`) to a "
                f"module name of the trunk such as {_layer_candidates(encoder.trunk)}."
            ) from error
        sites[branch] = CamSite(encoder, module)
    return sites


def _resolve_one_class(value: Any, id2label: Mapping[int, str], where: str) -> int:
    labels = [id2label[i] for i in sorted(id2label)]
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`target_class`{where} must be a label name or a class index, got {value!r}.")
    if isinstance(value, (int, np.integer)):
        if not 0 <= int(value) < len(labels):
            raise ValueError(
                f"`target_class`{where}={int(value)} is out of range; use an index in [0, {len(labels)}) or one of "
                f"the labels {labels}."
            )
        return int(value)
    if isinstance(value, str):
        lookup = {label.lower(): index for index, label in enumerate(labels)}
        if value.strip().lower() in lookup:
            return lookup[value.strip().lower()]
        if value.strip().isdigit():
            return _resolve_one_class(int(value.strip()), id2label, where)
        raise ValueError(f"Unknown `target_class`{where} {value!r}; the labels are {labels}.")
    raise ValueError(
        f"`target_class`{where} must be a label name, a class index or None, got {type(value).__name__}; the labels "
        f"are {labels}."
    )


def resolve_target_classes(target_class: Any, id2label: Mapping[int, str], batch_size: int) -> list[int | None]:
    """`target_class` (None = the predicted class, a label name, a class index, or a list with one per image) as a
    list of class indices (None where the predicted class is meant). Unknown names raise a `ValueError` listing the
    labels."""
    if isinstance(target_class, (list, tuple)):
        if len(target_class) != batch_size:
            raise ValueError(
                f"`target_class` holds {len(target_class)} entries for {batch_size} images; pass one per image, or a "
                "single label for all."
            )
        return [None if t is None else _resolve_one_class(t, id2label, f"[{i}]") for i, t in enumerate(target_class)]
    if target_class is None:
        return [None] * batch_size
    return [_resolve_one_class(target_class, id2label, "")] * batch_size


def model_lock(model: nn.Module) -> threading.RLock:
    """One re-entrant lock per model: explanations switch modes and hook layers, so two of them on the same model must
    not interleave."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def preserved_model_state(model: nn.Module, inplace_off: bool = False, keep_grads: bool = False) -> Iterator[None]:
    """Put `model` in eval mode for the block and restore every module's train/eval flag afterwards.

    With `inplace_off`, every module with a boolean `inplace` attribute (ReLU, SiLU, timm's norm-act layers, ...) is
    switched to out-of-place and restored; with `keep_grads`, every parameter's `requires_grad` flag and `.grad` are
    restored (for code that calls `backward` or `zero_grad` on the model).
    """
    training = [module for module in model.modules() if module.training]
    inplace = []
    if inplace_off:
        inplace = [(m, m.inplace) for m in model.modules() if isinstance(getattr(m, "inplace", None), bool)]
    parameters = [(p, p.requires_grad, p.grad) for p in model.parameters()] if keep_grads else []
    try:
        if training:
            model.eval()
        for module, _ in inplace:
            module.inplace = False
        yield
    finally:
        for module in training:
            module.training = True
        for module, flag in inplace:
            module.inplace = flag
        for parameter, requires_grad, grad in parameters:
            parameter.grad = grad
            parameter.requires_grad_(requires_grad)


# --------------------------------------------------------------------------------------------------------------------
# Fast Grad-CAM
# --------------------------------------------------------------------------------------------------------------------
class _ActivationTaps:
    """Forward hooks for one explanation: each encoder runs with autograd off until its Grad-CAM site, whose activation
    becomes an autograd leaf (recorded, in call order) from which recording resumes. The hooks only act in the thread
    that created them, so a plain prediction running concurrently in another thread passes through untouched."""

    def __init__(self, sites: dict[str, CamSite]):
        self.thread = threading.get_ident()
        self.sites = sites
        self.records: dict[int, list[torch.Tensor]] = {}
        self.handles = []
        try:
            # With shared encoders both branches name the same encoder and layer: hook them once. The pre-hook sits on
            # the encoder because it calls its trunk's `forward_features` directly, which runs no trunk hooks.
            for site in {id(site.layer): site for site in sites.values()}.values():
                self.records[id(site.layer)] = []
                self.handles.append(site.encoder.register_forward_pre_hook(self._stop_recording))
                self.handles.append(site.layer.register_forward_hook(self._keep(id(site.layer))))
        except BaseException:
            self.remove()
            raise

    def _stop_recording(self, module: nn.Module, args: Any) -> None:
        if threading.get_ident() == self.thread:
            torch.set_grad_enabled(False)

    def _keep(self, key: int):
        def hook(module: nn.Module, args: Any, output: Any) -> torch.Tensor | None:
            if threading.get_ident() != self.thread:
                return None
            if not isinstance(output, torch.Tensor) or output.ndim != 4:
                kind = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(
                    f"Grad-CAM needs a layer whose output is (batch_size, channels, height, width), got {kind} from "
                    f"{type(module).__name__}; set `gradcam_target_layer` in the config to a convolutional stage."
                )
            torch.set_grad_enabled(True)
            leaf = output.detach().requires_grad_(True)
            self.records[key].append(leaf)
            # A copy goes on, so an in-place op after the layer cannot modify the leaf we differentiate against.
            return leaf.clone()

        return hook

    def activations(self) -> dict[str, torch.Tensor]:
        """Per branch, the recorded leaf. The model calls the image encoder before the lesion encoder, so with shared
        encoders the first call is the image branch's."""
        taken: dict[int, int] = {}
        result = {}
        for branch, site in self.sites.items():
            key = id(site.layer)
            index = taken.get(key, 0)
            if index >= len(self.records[key]):
                raise RuntimeError(f"The Grad-CAM layer of the {branch} encoder did not run during the forward pass.")
            result[branch] = self.records[key][index]
            taken[key] = index + 1
        return result

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def normalize_cam(cam: torch.Tensor) -> torch.Tensor:
    """Min-max scale each map of `(batch_size, height, width)` to [0, 1], as pytorch-grad-cam's `scale_cam_image`
    (whose two passes, before and after resizing, amount to dividing by the maximum). An all-zero map stays 0."""
    cam = cam - cam.flatten(1).min(1).values.view(-1, 1, 1)
    peak = cam.flatten(1).max(1).values.view(-1, 1, 1)
    return torch.where(peak > 0, cam / peak.clamp(min=torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))


def compute_cam(activations: torch.Tensor, gradients: torch.Tensor, method: str = "gradcam") -> torch.Tensor:
    """Class activation maps `(batch_size, height, width)` in [0, 1] from a layer's activations and the gradients of
    the class score with respect to them (both `(batch_size, channels, height, width)`), by the formulas of
    pytorch-grad-cam's GradCAM, GradCAMPlusPlus, HiResCAM, XGradCAM, LayerCAM and GradCAMElementWise (written out:
    remote code may not import grad-cam; tests/test_explain.py checks each against the library)."""
    if method not in FAST_CAM_METHODS:
        raise ValueError(f"Unknown fast CAM `method` {method!r}; choose one of {list(FAST_CAM_METHODS)}.")
    a, g = activations.detach().float(), gradients.detach().float()
    spatial = (2, 3)
    if method == "gradcam":
        cam = (g.mean(spatial, keepdim=True) * a).sum(1)
    elif method == "hirescam":
        cam = (g * a).sum(1)
    elif method == "gradcamelementwise":
        cam = (g * a).clamp(min=0).sum(1)
    elif method == "layercam":
        cam = (g.clamp(min=0) * a).sum(1)
    elif method == "xgradcam":
        weights = (g * a / (a.sum(spatial, keepdim=True) + 1e-7)).sum(spatial, keepdim=True)
        cam = (weights * a).sum(1)
    else:  # gradcam++, eq. 19 of arXiv:1710.11063
        g2 = g.pow(2)
        alpha = g2 / (2 * g2 + a.sum(spatial, keepdim=True) * g2 * g + 1e-6)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        cam = ((g.clamp(min=0) * alpha).sum(spatial, keepdim=True) * a).sum(1)
    return normalize_cam(cam.clamp(min=0))


def _plain(value: Any) -> Any:
    """Inference-mode tensors cannot take part in autograd; give the explanation ordinary copies."""
    if isinstance(value, torch.Tensor) and value.is_inference():
        return value.clone()
    return value


def _detach_output(outputs: Any) -> Any:
    for key, value in list(outputs.items()):
        if isinstance(value, torch.Tensor):
            outputs[key] = value.detach()
        elif isinstance(value, tuple):
            outputs[key] = tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in value)
    return outputs


class SkinDualNetGradCAM:
    """Fast Grad-CAM on both encoders of a [`SkinDualNet`]: one forward, one backward down to the hooked activations.

    Args:
        method (`str`, *optional*, defaults to `"gradcam"`): one of `FAST_CAM_METHODS`. Other CAM methods (EigenCAM,
            ScoreCAM, ...) run through pytorch-grad-cam: `modeling_skinlesion.grad_cam_backend.SkinDualNetLibraryCAM`.
        layer (`str`, *optional*): a module inside each timm trunk; defaults to `model.config.gradcam_target_layer`,
            then to the trunk's last timm `feature_info` module (see `resolve_cam_sites`).

    Calling it with the model and its inputs returns a [`SkinDualNetExplanation`]. The model is left as it was found:
    its train/eval flags are restored, no hook stays registered, no parameter gets a gradient, no flag is changed.
    Works inside `torch.no_grad()` / `torch.inference_mode()` blocks (it turns gradients on for itself only).

    Example:
        >>> explanation = SkinDualNetGradCAM()(model, pixel_values, target_class="mel", **metadata)
        >>> explanation.heatmaps["lesion"].shape  # (batch_size, 7, 7) for a DenseNet at 224 px
    """

    def __init__(self, method: str = "gradcam", layer: str | None = None):
        if method not in FAST_CAM_METHODS:
            raise ValueError(
                f"Unknown fast CAM `method` {method!r}; choose one of {list(FAST_CAM_METHODS)}, or, with the "
                "skin-dualnet package and grad-cam installed, `modeling_skinlesion.grad_cam_backend.get_explainer"
                f"({method!r})` for the other pytorch-grad-cam methods."
            )
        self.method = method
        self.layer = layer

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.method!r}, layer={self.layer!r})"

    def __call__(
        self, model: nn.Module, pixel_values: torch.Tensor, target_class: Any = None, **model_inputs: Any
    ) -> SkinDualNetExplanation:
        r"""
        model ([`SkinDualNet`]):
            The classifier.
        pixel_values (`torch.Tensor` of shape `(batch_size, 3, height, width)`):
            Normalised images.
        target_class (`int`, `str`, `list` or `None`):
            The class to explain (None = predicted), for all images or one per image.
        model_inputs:
            The other forward arguments: `age`, `sex_ids`, `site_ids`, `lesion_mask`, `lesion_pixel_values`.
        """
        sites = resolve_cam_sites(model, self.layer)
        with model_lock(model), preserved_model_state(model), torch.inference_mode(False), torch.enable_grad():
            model_inputs = {key: _plain(value) for key, value in model_inputs.items()}
            taps = _ActivationTaps(sites)
            try:
                outputs = model(pixel_values=_plain(pixel_values), **model_inputs)
                activations = taps.activations()
            finally:
                taps.remove()
            logits = outputs.logits
            targets = resolve_target_classes(target_class, model.config.id2label, logits.shape[0])
            predicted = logits.detach().argmax(-1).tolist()
            targets = [p if t is None else t for t, p in zip(targets, predicted)]
            if not logits.requires_grad:
                raise RuntimeError("The logits do not depend on the Grad-CAM layers' activations; nothing to explain.")
            index = torch.tensor(targets, device=logits.device).unsqueeze(1)
            score = logits.gather(1, index).sum()
            leaves = list(activations.values())
            gradients = torch.autograd.grad(score, leaves, allow_unused=True)
        heatmaps = {
            branch: compute_cam(leaf, grad if grad is not None else torch.zeros_like(leaf), self.method)
            for (branch, leaf), grad in zip(activations.items(), gradients)
        }
        return SkinDualNetExplanation(outputs=_detach_output(outputs), target_classes=targets, heatmaps=heatmaps)


# --------------------------------------------------------------------------------------------------------------------
# Placement and lesion focus
# --------------------------------------------------------------------------------------------------------------------
def resize_cams(heatmaps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize maps `(batch_size, h, w)` to `size` and min-max scale them again, as pytorch-grad-cam does
    when it brings a layer's CAM to the input size."""
    resized = F.interpolate(heatmaps.detach().float()[:, None], size=size, mode="bilinear", align_corners=False)
    return normalize_cam(resized[:, 0])


def heatmap_to_image(
    heatmap: torch.Tensor | np.ndarray,
    image_size: tuple[int, int],
    box: Sequence[float] | torch.Tensor | None = None,
    input_size: tuple[int, int] | None = None,
    normalize: bool = True,
) -> np.ndarray:
    """Place a heatmap on the original image: float32 `(height, width)` = `image_size`.

    Without `box` the heatmap covers the whole image (the image branch) and is resized bilinearly. With `box`
    (`(x0, y0, x1, y1)` in pixels of the processed input of size `input_size` = `(height, width)`, as in
    `SkinDualNetOutput.lesion_boxes`), the heatmap covers the lesion image, which was resampled from that box: it is
    mapped back into the box (scaled to original pixels) and everything outside the box is 0. With `normalize` the
    placed map is min-max scaled to [0, 1] at the image's resolution (bilinear resizing moves no pixel exactly onto a
    cell centre, so the resized extremes sit slightly inside the map's range).
    """
    placed = _place_heatmap(heatmap, image_size, box, input_size)
    if normalize:
        placed = normalize_cam(torch.from_numpy(placed)[None])[0].numpy()
    return placed


def _place_heatmap(
    heatmap: torch.Tensor | np.ndarray,
    image_size: tuple[int, int],
    box: Sequence[float] | torch.Tensor | None,
    input_size: tuple[int, int] | None,
) -> np.ndarray:
    heat = torch.as_tensor(heatmap).detach().float().cpu()
    if heat.ndim != 2:
        raise ValueError(f"`heatmap` must have shape (height, width), got {tuple(heat.shape)}.")
    height, width = int(image_size[0]), int(image_size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"`image_size` must be a positive (height, width), got {image_size}.")
    heat = heat[None, None]
    if box is None:
        return F.interpolate(heat, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
    if input_size is None:
        raise ValueError("`input_size` (height, width of the processed image) is required with `box`.")
    x0, y0, x1, y1 = (float(v) for v in torch.as_tensor(box).flatten().tolist())
    scale_x, scale_y = width / float(input_size[1]), height / float(input_size[0])
    x0, x1, y0, y1 = x0 * scale_x, x1 * scale_x, y0 * scale_y, y1 * scale_y
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"`box` must satisfy x0 < x1 and y0 < y1, got {tuple(torch.as_tensor(box).tolist())}.")
    # Pixels whose centre (c + 0.5) lies inside [x0, x1) x [y0, y1).
    c0, c1 = max(0, math.ceil(x0 - 0.5)), min(width, math.ceil(x1 - 0.5))
    r0, r1 = max(0, math.ceil(y0 - 0.5)), min(height, math.ceil(y1 - 0.5))
    placed = np.zeros((height, width), dtype=np.float32)
    if c1 <= c0 or r1 <= r0:
        return placed
    # Normalised lesion-image coordinates (-1 = left edge of the box, 1 = right edge), as `build_lesion_image`'s
    # affine grid used them (align_corners=False).
    gx = (torch.arange(c0, c1, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
    gy = (torch.arange(r0, r1, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # (rows, cols, 2) as (x, y)
    sampled = F.grid_sample(heat, grid[None], mode="bilinear", padding_mode="border", align_corners=False)
    placed[r0:r1, c0:c1] = sampled[0, 0].numpy()
    return placed


def lesion_focus(heatmap: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> float:
    """Share of the heatmap's mass inside the lesion mask, in [0, 1]: sum(heatmap * mask) / sum(heatmap).

    Both are `(height, width)` (the heatmap non-negative). Returns NaN for an all-zero heatmap (no mass to share); an
    empty mask gives 0.
    """
    heat = heatmap.detach().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    binary = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    heat, binary = np.squeeze(heat), np.squeeze(binary).astype(bool)
    if heat.shape != binary.shape or heat.ndim != 2:
        raise ValueError(
            f"`heatmap` {heat.shape} and `mask` {binary.shape} must be 2-D maps of the same size; place heatmaps on "
            "the image first (`heatmap_to_image`)."
        )
    if heat.size and heat.min() < 0:
        raise ValueError(f"`heatmap` must be non-negative (0 = cold), got a minimum of {heat.min():.4g}.")
    total = float(heat.sum(dtype=np.float64))
    if total <= 0:
        return float("nan")
    return float(heat[binary].sum(dtype=np.float64) / total)


__all__ = [
    "BRANCHES",
    "FAST_CAM_METHODS",
    "CamSite",
    "SkinDualNetExplanation",
    "SkinDualNetGradCAM",
    "check_dualnet",
    "compute_cam",
    "heatmap_to_image",
    "lesion_focus",
    "model_lock",
    "normalize_cam",
    "preserved_model_state",
    "resize_cams",
    "resolve_cam_sites",
    "resolve_target_classes",
]
