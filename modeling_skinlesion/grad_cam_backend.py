"""Package-only: the pytorch-grad-cam backend of skin-dualnet's explanations, and the one explainer factory.

Not shipped as remote code (the shipped files are the `*_skinlesion.py` modules, which import nothing of the installed
package); a pipeline loaded from the Hub takes these explainers as objects:
`pipeline("skin-lesion-analysis", model=..., explainer=get_explainer("scorecam"))`.

- `SkinDualNetLibraryCAM`: pytorch-grad-cam, used as its README shows (a `with GradCAM(...) as cam:` block per branch
  and image, a thin wrapper that returns logits and passes the other branch's input and the metadata through); every
  method of `LIBRARY_CAM_METHODS` (EigenCAM, ScoreCAM, AblationCAM, ...). Needs `pip install grad-cam`.
- `get_explainer(method, backend)` picks it or the fast `SkinDualNetGradCAM` of `explaining_skinlesion` (one forward
  and a backward down to the hooked activations, pure torch); both return a `SkinDualNetExplanation` and leave the
  model as they found it.
"""

import importlib
from typing import Any

import torch
from torch import nn

from .explaining_skinlesion import (
    BRANCHES,
    FAST_CAM_METHODS,
    CamSite,
    SkinDualNetExplanation,
    SkinDualNetGradCAM,
    model_lock,
    preserved_model_state,
    resolve_cam_sites,
    resolve_target_classes,
)

# Method name -> pytorch-grad-cam class. Methods that need something other than target layers and class targets
# (FullGrad hooks every bias, FinerCAM compares classes, ShapleyCAM needs second-order gradients) are left out.
LIBRARY_CAM_METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "gradcamelementwise": "GradCAMElementWise",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "kpcacam": "KPCA_CAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
    "randomcam": "RandomCAM",
}


def _import_grad_cam() -> Any:
    try:
        return importlib.import_module("pytorch_grad_cam")
    except ImportError as error:
        raise ImportError(
            "The pytorch-grad-cam explanation path needs the `grad-cam` package: `pip install grad-cam`."
        ) from error


class _SkinDualNetLogits(nn.Module):
    """What pytorch-grad-cam expects from a model: one input tensor in, logits out. The branch being explained gets
    the input (the image, or the lesion image); the other branch's input and the metadata pass through unchanged.

    With shared encoders the hooked layer runs twice per forward (image, then lesion image), and pytorch-grad-cam
    cannot tell those calls apart. So a routing hook sends each call's output through an identity tap of its own
    branch, and the library hooks the tap of the branch being explained.
    """

    def __init__(
        self,
        model: nn.Module,
        branch: str,
        pixel_values: torch.Tensor,
        lesion_pixel_values: torch.Tensor | None,
        metadata: dict[str, torch.Tensor],
    ):
        super().__init__()
        self.model = model
        self.branch = branch
        self.fixed = {"pixel_values": pixel_values, "lesion_pixel_values": lesion_pixel_values, **metadata}
        self.taps = nn.ModuleDict({name: nn.Identity() for name in BRANCHES})
        self._calls: dict[int, int] = {}

    def route(self, sites: dict[str, CamSite]) -> list[Any]:
        """Register the routing hooks of `sites`; returns their handles."""
        handles = []
        for site in {id(site.layer): site for site in sites.values()}.values():
            branches = [branch for branch, other in sites.items() if other.layer is site.layer]

            def hook(module: nn.Module, args: Any, output: torch.Tensor, key: int = id(site.layer), branches=branches):
                call = self._calls.get(key, 0)  # shared encoders: the first call is the image branch's
                self._calls[key] = call + 1
                return self.taps[branches[min(call, len(branches) - 1)]](output)

            handles.append(site.layer.register_forward_hook(hook))
        return handles

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self._calls.clear()
        batch = inputs.shape[0]
        kwargs = {}
        for key, value in self.fixed.items():
            if isinstance(value, torch.Tensor) and value.shape[0] != batch:
                value = value.expand(batch, *value.shape[1:])  # one image's context for a batch of perturbed inputs
            kwargs[key] = value
        kwargs["pixel_values" if self.branch == "image" else "lesion_pixel_values"] = inputs
        return self.model(**kwargs).logits


class SkinDualNetLibraryCAM:
    """Explanations through pytorch-grad-cam: per branch and per image, one `with CAM(model=wrapper,
    target_layers=[layer]) as cam:` block, the straightforward way (a full forward and backward each, parameter
    gradients included). Use it for methods the fast path lacks, and as the reference the fast path is checked against.

    Args:
        method (`str`, *optional*, defaults to `"gradcam"`): a key of `LIBRARY_CAM_METHODS`.
        layer (`str`, *optional*): a module inside each timm trunk; by default the same site as the fast path
            (`resolve_cam_sites`).

    While it runs, every in-place activation of the model is switched off (an in-place op right after the hooked layer
    breaks the library's gradient hooks) and the model is in eval mode; afterwards the in-place flags, train/eval
    flags, `requires_grad` flags and `.grad` of every parameter are restored and no hook is left.
    """

    def __init__(self, method: str = "gradcam", layer: str | None = None):
        if method not in LIBRARY_CAM_METHODS:
            raise ValueError(f"Unknown CAM `method` {method!r}; choose one of {list(LIBRARY_CAM_METHODS)}.")
        self.method = method
        self.layer = layer
        self.cam_class = getattr(_import_grad_cam(), LIBRARY_CAM_METHODS[method])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.method!r}, layer={self.layer!r})"

    def __call__(
        self, model: nn.Module, pixel_values: torch.Tensor, target_class: Any = None, **model_inputs: Any
    ) -> SkinDualNetExplanation:
        """Same arguments and result as `SkinDualNetGradCAM.__call__`; heatmaps are at the branch input's size."""
        sites = resolve_cam_sites(model, self.layer)
        metadata = {k: v for k, v in model_inputs.items() if k in ("age", "sex_ids", "site_ids") and v is not None}
        with model_lock(model):
            with torch.inference_mode(), preserved_model_state(model):
                outputs = model(pixel_values=pixel_values, **model_inputs)
            targets = resolve_target_classes(target_class, model.config.id2label, pixel_values.shape[0])
            predicted = outputs.logits.argmax(-1).tolist()
            targets = [p if t is None else t for t, p in zip(targets, predicted)]
            heatmaps: dict[str, list[torch.Tensor]] = {branch: [] for branch in sites}
            with preserved_model_state(model, inplace_off=True, keep_grads=True), torch.inference_mode(False):
                for i, target in enumerate(targets):
                    lesion = outputs.lesion_pixel_values
                    context = {
                        "pixel_values": pixel_values[i : i + 1].clone(),
                        "lesion_pixel_values": lesion[i : i + 1].clone() if lesion is not None else None,
                        "metadata": {k: v[i : i + 1].clone() for k, v in metadata.items()},
                    }
                    for branch in sites:
                        heatmaps[branch].append(self._one(model, branch, sites, context, target))
        return SkinDualNetExplanation(
            outputs=outputs,
            target_classes=targets,
            heatmaps={branch: torch.cat(maps) for branch, maps in heatmaps.items()},
        )

    def _one(
        self, model: nn.Module, branch: str, sites: dict[str, CamSite], context: dict[str, Any], target: int
    ) -> torch.Tensor:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        wrapper = _SkinDualNetLogits(
            model, branch, context["pixel_values"], context["lesion_pixel_values"], context["metadata"]
        )
        inputs = context["pixel_values" if branch == "image" else "lesion_pixel_values"].clone()
        # The input requires grad so the hooked activations do even when every parameter is frozen.
        inputs.requires_grad_(True)
        handles = wrapper.route(sites)
        maps = None
        try:
            with torch.enable_grad(), self.cam_class(model=wrapper, target_layers=[wrapper.taps[branch]]) as cam:
                maps = cam(input_tensor=inputs, targets=[ClassifierOutputTarget(target)])
        finally:
            for handle in handles:
                handle.remove()
        if maps is None:  # the library's context manager swallows IndexError and prints it
            raise RuntimeError(f"pytorch-grad-cam's {self.cam_class.__name__} failed on the {branch} branch.")
        return torch.from_numpy(maps).float()


def get_explainer(method: str = "gradcam", backend: str = "auto", layer: str | None = None) -> Any:
    """The one explainer factory: the fast path (`SkinDualNetGradCAM`) when it has `method` (`backend="auto"` or
    `"fast"`), else pytorch-grad-cam (`SkinDualNetLibraryCAM`; `backend="library"`, or `"auto"` for methods only the
    library has)."""
    if backend not in ("auto", "fast", "library"):
        raise ValueError(f"`backend` must be 'auto', 'fast' or 'library', got {backend!r}.")
    known = sorted(set(FAST_CAM_METHODS) | set(LIBRARY_CAM_METHODS))
    if method not in known:
        raise ValueError(f"Unknown CAM `method` {method!r}; choose one of {known}.")
    if backend == "fast" and method not in FAST_CAM_METHODS:
        raise ValueError(
            f"The fast backend has no {method!r}; it offers {list(FAST_CAM_METHODS)}. Use backend='library'."
        )
    if backend == "library" or method not in FAST_CAM_METHODS:
        return SkinDualNetLibraryCAM(method, layer)
    return SkinDualNetGradCAM(method, layer)


__all__ = ["LIBRARY_CAM_METHODS", "SkinDualNetLibraryCAM", "get_explainer"]
