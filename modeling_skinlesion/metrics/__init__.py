"""The skin-dualnet `evaluate` metric modules, shipped inside the package so an installed user can load them offline.

Example:
    >>> import evaluate
    >>> from modeling_skinlesion.metrics import metric_path
    >>> dice = evaluate.load(metric_path("lesion_segmentation"))
"""

from pathlib import Path

METRICS = ("lesion_segmentation", "lesion_classification")

# What both metric modules cite and follow: the ISIC 2018 challenge paper and the official scorer. (The modules
# import these from the installed package: `evaluate.load` only finds relative imports in a module's own folder.)
ISIC_CITATION = """
@article{codella2019skin,
  title={Skin Lesion Analysis Toward Melanoma Detection 2018: A Challenge Hosted by the International Skin Imaging
         Collaboration (ISIC)},
  author={Codella, Noel and Rotemberg, Veronica and Tschandl, Philipp and others},
  journal={arXiv preprint arXiv:1902.03368},
  year={2019}
}
"""
ISIC_SCORER_URL = "https://github.com/ImageMarkup/isic-challenge-scoring"


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


__all__ = ["METRICS", "ISIC_CITATION", "ISIC_SCORER_URL", "metric_path"]
