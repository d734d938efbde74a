"""The training library of skin-dualnet: what scripts/train_segmenter.py, train_classifier.py, finetune.py,
calibrate.py, evaluate_model.py and ablation_report.py are thin command lines over. Package-only (never shipped as
remote code); `import modeling_skinlesion.training` is lazy, each name is imported on first use.

| module          | holds                                                                                       |
| --------------- | ------------------------------------------------------------------------------------------- |
| `arguments`     | the options of every script as dataclasses (`HfArgumentParser`), `FinetuneArguments`         |
| `loop`          | the Accelerator, data and split, `prepare_run`, `train_loop`, what a run writes               |
| `checkpoints`   | resumable checkpoints and the best epoch's weights                                            |
| `feature_cache` | training on cached frozen-trunk features (`--frozen-stages`, fine-tuning with frozen encoders) |
| `evaluation`    | validation during training, calibration fits, evaluation of a saved model                    |
| `finetuning`    | a new clinic: `load_clinic`, `finetune`                                                       |
| `calibration`   | `recalibrate`: bias, temperature, referral point and out-of-distribution gate for a population |

A clinic, from Python:

    from modeling_skinlesion.training import finetune, load_clinic

    data = load_clinic("clinic/photos", "clinic/cases.csv", column_map={"image": "file", "label": "diagnosis"},
                       label_map={"naevus": "nv", "melanoma": "mel"})
    model, report = finetune("checkpoints/skin-dualnet-small", data, "runs/clinic", freeze_encoders=True,
                             test_size=0.2)
"""

import importlib
from typing import TYPE_CHECKING, Any

_LAZY_NAMES = {
    "ClinicData": "finetuning",
    "load_clinic": "finetuning",
    "finetune": "finetuning",
    "FinetuneArguments": "arguments",
    "parse_arguments": "arguments",
    "recalibrate": "calibration",
    "train_loop": "loop",
    "prepare_run": "loop",
}


def __getattr__(name: str) -> Any:
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY_NAMES])


if TYPE_CHECKING:
    from .arguments import FinetuneArguments, parse_arguments  # noqa: F401
    from .calibration import recalibrate  # noqa: F401
    from .finetuning import ClinicData, finetune, load_clinic  # noqa: F401
    from .loop import prepare_run, train_loop  # noqa: F401

__all__ = list(_LAZY_NAMES)
