"""Run Python code in a fresh process that cannot import this repository's package, as a Hub user would."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

_BLOCKER = '''
import importlib.abc
import sys


class _BlockSkinLesion(importlib.abc.MetaPathFinder):
    """The package is installed (editable) in this venv; a real Hub user does not have it."""

    def find_spec(self, name, path=None, target=None):
        if name == "modeling_skinlesion" or name.startswith("modeling_skinlesion."):
            raise ImportError(f"{name} is blocked: this process must load the model through remote code only")
        return None


sys.meta_path.insert(0, _BlockSkinLesion())
'''


def run_isolated(code: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    """Run `code` with `modeling_skinlesion` unimportable, from `cwd`, offline; return stdout or raise with stderr."""
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    script = cwd / "isolated_main.py"
    script.write_text(_BLOCKER + textwrap.dedent(code))
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full_env.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf_home"), "PYTHONNOUSERSITE": "1"})
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-P", str(script)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"isolated process failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout
