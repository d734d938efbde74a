"""Deprecated alias, package-only: the pytorch-grad-cam backend is `modeling_skinlesion.grad_cam_backend`; the fast
Grad-CAM, placement and focus are in `modeling_skinlesion.explaining_skinlesion`. Kept only until
scripts/evaluate_model.py imports from those; remove it then."""

from .explaining_skinlesion import SkinDualNetGradCAM, heatmap_to_image, lesion_focus  # noqa: F401
from .grad_cam_backend import LIBRARY_CAM_METHODS, SkinDualNetLibraryCAM, get_explainer  # noqa: F401
