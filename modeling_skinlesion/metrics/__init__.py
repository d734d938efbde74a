"""The skin-dualnet `evaluate` metric modules, shipped inside the package so an installed user can load them offline.

Example:
    >>> import evaluate
    >>> from modeling_skinlesion.metrics import metric_path
    >>> dice = evaluate.load(metric_path("lesion_segmentation"))
"""

from pathlib import Path

METRICS = ("lesion_segmentation", "lesion_classification")


def metric_path(name: str) -> str:
    """The folder of the shipped metric module `name`, to pass to `evaluate.load`."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; the shipped metrics are {list(METRICS)}.")
    folder = Path(__file__).resolve().parent / name
    if not (folder / f"{name}.py").is_file():
        raise ValueError(
            f"The metric module {folder / (name + '.py')} is missing from this installation; reinstall skin-dualnet."
        )
    return str(folder)


__all__ = ["METRICS", "metric_path"]
