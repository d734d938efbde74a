"""`modeling_skinlesion.hub.check_model_source` for the command-line tools, without importing the package first.

`hub.py` needs only the standard library at import (huggingface_hub when it checks); loaded from its file it skips the
package's `__init__` (torch, transformers, torchvision: about 5 s of imports), so a model id that cannot be loaded
fails in about half a second with one line.
"""

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("skin_dualnet_hub", REPO_ROOT / "modeling_skinlesion" / "hub.py")
_hub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_hub)

SHIPPED_MODEL = REPO_ROOT / _hub.SHIPPED_CHECKPOINT
# Return if the id is a local folder, a cached Hub id or one the Hub answers for; else `ValueError`, one line naming
# the local alternatives (the shipped checkpoint, outputs/demo-model).
check_model_source = _hub.check_model_source
