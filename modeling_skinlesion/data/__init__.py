"""Data for skin-dualnet: loaders for the official dermoscopy layouts, grouped splits, file checks, joint augmentation
of images and masks, and the collate function the training scripts use.

| module       | holds                                                                                           |
| ------------ | ----------------------------------------------------------------------------------------------- |
| `schema`     | the unified schema, label sets, helpers shared by the loaders                                   |
| `isic`       | HAM10000, ISIC 2016 / 2017 / 2018 Task 1, ISIC 2019 as downloaded; the shared ISIC 2017 copy     |
| `ph2`        | PH2 as downloaded                                                                               |
| `custom`     | any folder + CSV (`load_clinic`), any `datasets.Dataset` (`map_columns`, `load_hub`)            |
| `sources`    | `LOADERS` / `load_source(name, root, **kwargs)`, the one dataset dispatch; `concatenate_sources`  |
| `splits`     | grouped, stratified splits, the leak check, class counts and weights                            |
| `files`      | `validate_files`: bad files reported by name                                                    |
| `transforms` | `SkinLesionTransform` (torchvision.transforms.v2), `build_dataloader`                           |

Every loader returns a `datasets.Dataset` with one schema (see `dataset_features`):

| column     | feature                          | meaning                                                        |
| ---------- | -------------------------------- | -------------------------------------------------------------- |
| `image`    | `datasets.Image()`               | the image file path, decoded lazily on access                  |
| `mask`     | `datasets.Image()`               | the lesion mask file path, or None                             |
| `label`    | `datasets.ClassLabel(names=...)` | class index, -1 = no label (segmentation-only sets)            |
| `age`      | `float32`                        | age in years, NaN = missing                                    |
| `sex`      | `string`                         | raw value from the source, None = missing                      |
| `site`     | `string`                         | anatomical site, raw value from the source, None = missing     |
| `group_id` | `string`                         | lesion id (or patient / image id when none): the split unit    |
| `source`   | `string`                         | which loader made the row ("ham10000", "isic2019", ...)        |
| `image_id` | `string`                         | image name without extension                                   |

Only file paths are stored, so a 25k-image ISIC 2019 set costs a few megabytes until images are read.

This package is not part of the remote code (it imports `datasets` and torchvision); the modeling files never import
it. Its loggers are children of `modeling_skinlesion.data`, so one `setLevel` on that name covers them all.
"""

from .custom import load_clinic, load_hub, map_columns
from .files import FileValidationSummary, check_image_file, validate_files
from .isic import load_ham10000, load_isic2016_task1, load_isic2017, load_isic2018_task1, load_isic2019
from .ph2 import load_ph2
from .schema import (
    HAM10000_LABELS,
    ISIC2019_LABELS,
    PH2_LABELS,
    SCHEMA_COLUMNS,
    column_values,
    dataset_features,
    label_names,
)
from .sources import LOADERS, concatenate_sources, load_source
from .splits import balanced_class_weights, check_no_group_leak, class_counts, grouped_split
from .transforms import (
    RandomQuarterTurn,
    RandomReflectAffine,
    SkinLesionCollator,
    SkinLesionRows,
    SkinLesionTransform,
    build_dataloader,
    prepare_for_transform,
)

__all__ = [
    "HAM10000_LABELS",
    "ISIC2019_LABELS",
    "LOADERS",
    "PH2_LABELS",
    "SCHEMA_COLUMNS",
    "FileValidationSummary",
    "RandomQuarterTurn",
    "RandomReflectAffine",
    "SkinLesionCollator",
    "SkinLesionRows",
    "SkinLesionTransform",
    "balanced_class_weights",
    "build_dataloader",
    "check_image_file",
    "check_no_group_leak",
    "class_counts",
    "column_values",
    "concatenate_sources",
    "dataset_features",
    "grouped_split",
    "label_names",
    "load_clinic",
    "load_ham10000",
    "load_hub",
    "load_isic2016_task1",
    "load_isic2017",
    "load_isic2018_task1",
    "load_isic2019",
    "load_ph2",
    "load_source",
    "map_columns",
    "prepare_for_transform",
    "validate_files",
]
