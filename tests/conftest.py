"""Shared paths, presets and tiny models for the whole suite.

Import the constants and builders with `from conftest import ...`; use the fixtures by name. A test module builds its
own model only when it needs something these do not give (a different preset, an option under test).
"""

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts"
SPACE = REPO_ROOT / "space"
PRESETS = REPO_ROOT / "configuration"
CHECKPOINT = REPO_ROOT / "checkpoints" / "skin-dualnet-small"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# The one setting that locates the real HAM10000 / ISIC data used by tests.
DATA_ROOT = Path(os.environ.get("SKIN_DUALNET_DATA", REPO_ROOT.parent / "shared" / "data"))
LABELS = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def script_module(file_name: str, module_name: str):
    """`scripts/<file_name>` loaded as the module `module_name` (its `main(argv)` is the command line without a new
    interpreter); a name of its own, so that e.g. benchmark.py does not shadow a library called `benchmark`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_classifier(seed: int = 0, **overrides):
    """The tiny preset (`configuration/skin-dualnet-tiny.json`) with seeded random weights, in eval mode."""
    import torch
    from transformers import AutoConfig

    from modeling_skinlesion import SkinDualNet

    torch.manual_seed(seed)
    return SkinDualNet(AutoConfig.from_pretrained(PRESETS / "skin-dualnet-tiny.json", **overrides)).eval()


def tiny_segmenter(seed: int = 0, **overrides):
    """The tiny segmenter preset (`configuration/segmenter-tiny.json`) with seeded random weights, in eval mode."""
    import torch
    from transformers import AutoConfig

    from modeling_skinlesion import SkinLesionSegmenter

    torch.manual_seed(seed)
    return SkinLesionSegmenter(AutoConfig.from_pretrained(PRESETS / "segmenter-tiny.json", **overrides)).eval()


def real_images(count: int = 4) -> list[Path]:
    """Real images of both sizes: HAM10000 (600 x 450 or 200 x 150 here) first, then ISIC 2017 (up to 768 px)."""
    ham = sorted((DATA_ROOT / "ham10000" / "images").glob("*.jpg"))
    isic = sorted((DATA_ROOT / "isic2017" / "images").glob("*.jpg"))
    half = count // 2
    return ham[3 : 3 + count - half] + isic[:half]


def data_available() -> bool:
    return (DATA_ROOT / "ham10000").is_dir()


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not data_available():
        if os.environ.get("CI"):
            pytest.fail(f"Real data not found at {DATA_ROOT}; set SKIN_DUALNET_DATA.")
        pytest.skip(f"Real data not found at {DATA_ROOT}; set SKIN_DUALNET_DATA.")
    return DATA_ROOT


@pytest.fixture(scope="session")
def presets() -> Path:
    return PRESETS


@pytest.fixture(scope="session")
def saved_tiny_classifier(tmp_path_factory) -> Path:
    """A tiny classifier saved with `save_for_hub` (config, safetensors, processor, remote code, custom pipeline):
    the folder a Hub user downloads. Session-scoped: tests must not modify it."""
    from modeling_skinlesion import save_for_hub

    folder = tmp_path_factory.mktemp("saved") / "skin-dualnet-tiny"
    save_for_hub(tiny_classifier(), folder)
    return folder


@pytest.fixture
def in_process_run():
    """For a test that runs a script's `main(argv)` (or its helpers) in this process: puts back what a script sets for
    the whole process (logging levels and handlers, the datasets progress bars, Accelerate's shared state)."""
    import datasets
    from accelerate.state import AcceleratorState

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in list(logging.root.manager.loggerDict)}
    verbosity = datasets.utils.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in list(logging.root.manager.loggerDict):
        logging.getLogger(name).setLevel(levels.get(name, logging.NOTSET))
    datasets.utils.logging.set_verbosity(verbosity)
    (datasets.enable_progress_bars if bars else datasets.disable_progress_bars)()
