"""Shared fixtures: where the real data lives, and the tiny presets."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO_ROOT = Path(__file__).resolve().parents[1]
# The one setting that locates the real HAM10000 / ISIC data used by tests.
DATA_ROOT = Path(os.environ.get("SKIN_DUALNET_DATA", REPO_ROOT.parent / "shared" / "data"))
PRESETS = REPO_ROOT / "configuration"


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "ham10000").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"Real data not found at {DATA_ROOT}; set SKIN_DUALNET_DATA.")
        pytest.skip(f"Real data not found at {DATA_ROOT}; set SKIN_DUALNET_DATA.")
    return DATA_ROOT


@pytest.fixture(scope="session")
def presets() -> Path:
    return PRESETS
