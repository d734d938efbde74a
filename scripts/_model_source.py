"""`modeling_skinlesion.hub.check_model_source` for the command-line tools, without importing the package first.

`hub.py` needs only huggingface_hub; loaded from its file it skips the package's `__init__` (torch, transformers,
torchvision: about 5 s of imports), so a model id that cannot be loaded fails in about a second with one line.
"""

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO_ROOT / "checkpoints" / "skin-dualnet-small"


def check_model_source(source: str) -> None:
    """Return if `source` is a local folder, a cached Hub id or one the Hub answers for; else raise `ValueError` with
    one line naming the local alternatives (the shipped checkpoint, `outputs/demo-model`)."""
    spec = importlib.util.spec_from_file_location("skin_dualnet_hub", REPO_ROOT / "modeling_skinlesion" / "hub.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    hub.check_model_source(source, str(SHIPPED_MODEL.relative_to(REPO_ROOT)))
