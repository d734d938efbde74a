"""Checkpoints of a training run (`loop.train_loop`): the progress state they carry (`TrainingState`), the
rotated `accelerator.save_state` folders (`save_checkpoint`, `find_checkpoint` for `--resume`), and the best epoch's
weights (`save_best`, `load_best`)."""

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class TrainingState:
    """Progress saved with every checkpoint (`accelerator.register_for_checkpointing`)."""

    def __init__(self):
        self.completed_steps = 0
        self.best_key: str | None = None  # set by train_loop (not saved: a resumed run sets it again)
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.history: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "completed_steps": self.completed_steps,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": json.dumps(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.completed_steps = int(state["completed_steps"])
        self.best_metric = state["best_metric"]
        self.best_epoch = state["best_epoch"]
        self.history = json.loads(state["history"])


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (`checkpoint-<step>`), oldest first."""
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def find_checkpoint(resume: str | None, directory: Path) -> Path | None:
    """The checkpoint to resume from: `None` (fresh run), `"latest"` (newest in `directory`, or a fresh run when
    there is none yet) or an explicit folder."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(directory)
        if not checkpoints:
            logger.info(f"--resume latest: no checkpoint in {directory} yet, starting from scratch")
            return None
        return checkpoints[-1]
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"--resume {resume!r} is neither 'latest' nor a checkpoint folder.")
    return path


def save_checkpoint(accelerator: Accelerator, directory: Path, step: int, keep: int) -> Path:
    """`save_state` into a temporary folder renamed when complete (a run killed mid-save never leaves a partial
    `checkpoint-<step>`), then remove all but the `keep` newest."""
    final = directory / f"checkpoint-{step}"
    partial = directory / f".partial-checkpoint-{step}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


def unwrap_pretrained(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The `PreTrainedModel` inside a prepared model (or inside the cached-features wrapper of `--frozen-stages`)."""
    unwrapped = accelerator.unwrap_model(model)
    return getattr(unwrapped, "model", unwrapped) if not hasattr(unwrapped, "save_pretrained") else unwrapped


def save_best(accelerator: Accelerator, model: torch.nn.Module, directory: Path) -> None:
    if accelerator.is_main_process:
        unwrap_pretrained(accelerator, model).save_pretrained(directory, safe_serialization=True)
    accelerator.wait_for_everyone()


def load_best(accelerator: Accelerator, model: torch.nn.Module, directory: Path) -> bool:
    """Load the best weights saved by `save_best` into `model`; `False` when there are none."""
    path = directory / "model.safetensors"
    if not path.is_file():
        return False
    from safetensors.torch import load_file

    unwrapped = unwrap_pretrained(accelerator, model)
    missing, unexpected = unwrapped.load_state_dict(load_file(str(path)), strict=False)
    # Tied or non-persistent entries may be absent from the file; anything else is a real mismatch.
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise RuntimeError(f"Best model at {path} does not match: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    return True
