"""The remote-code boundary: `modeling_skinlesion/*_skinlesion.py` are exactly the files shipped to the Hub as remote
code; they import only each other (single-dot relative imports) plus torch / transformers (with its huggingface_hub) /
timm / numpy / PIL and the standard library, and load nothing dynamically; every other module of the package is
package-only."""

import ast
import sys

from conftest import CHECKPOINT, REPO_ROOT

PACKAGE = REPO_ROOT / "modeling_skinlesion"
SHIPPED = sorted(path.name for path in PACKAGE.glob("*_skinlesion.py"))
# huggingface_hub comes with transformers; its configs take `strict` from `huggingface_hub.dataclasses`, as ours do.
ALLOWED = {"torch", "transformers", "huggingface_hub", "timm", "numpy", "PIL"} | set(sys.stdlib_module_names)


def violations(source: str, siblings: set[str]) -> list[str]:
    """What in `source` breaks the rule for a shipped file whose shipped siblings are `siblings` (module names)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {alias.name}" for alias in node.names if alias.name.split(".")[0] not in ALLOWED]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            if node.module.split(".")[0] not in ALLOWED:
                found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom):
            targets = [node.module] if node.module else [alias.name for alias in node.names]
            if node.level != 1 or any(target.split(".")[0] not in siblings for target in targets):
                found.append(f"from {'.' * node.level}{node.module or ''} import ...")
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in ("import_module", "__import__", "find_spec"):
                found.append(f"dynamic import {name}(...) at line {node.lineno}")
    return found


def test_the_rule_catches_what_it_forbids():
    siblings = {"modeling_skinlesion", "configuration_skinlesion"}
    bad = """
import scipy
from modeling_skinlesion.grad_cam_backend import get_explainer
from .data import load_source
from .. import metrics
import importlib
backend = importlib.import_module("modeling_skinlesion.grad_cam_backend")
"""
    assert violations(bad, siblings) == [
        "import scipy",
        "from modeling_skinlesion.grad_cam_backend import ...",
        "from .data import ...",
        "from .. import ...",
        "dynamic import import_module(...) at line 7",
    ]
    good = "import os\nimport torch.nn.functional as F\nfrom PIL import Image\nfrom .modeling_skinlesion import M\n"
    assert violations(good, siblings) == []


def test_shipped_files_import_only_each_other_and_the_allowed_libraries():
    assert {"configuration_skinlesion.py", "modeling_skinlesion.py", "pipeline_skinlesion.py"} <= set(SHIPPED)
    siblings = {name.removesuffix(".py") for name in SHIPPED}
    found = {name: violations((PACKAGE / name).read_text(), siblings) for name in SHIPPED}
    assert found == {name: [] for name in SHIPPED}


def test_save_for_hub_and_the_shipped_checkpoint_carry_exactly_the_shipped_files(saved_tiny_classifier):
    assert sorted(path.name for path in saved_tiny_classifier.glob("*.py")) == SHIPPED
    assert sorted(path.name for path in CHECKPOINT.glob("*.py")) == SHIPPED
