"""Build the bundled demo sample `scripts/demo_data/ham10000-sample/` from a HAM10000 folder.

The sample keeps the official HAM10000 layout (`images/ISIC_*.jpg`, `masks/ISIC_*_segmentation.png`,
`HAM10000_metadata.csv` with the official columns), so every loader that reads the full download reads it too.

Selection (reproducible for a given `--seed` and source folder):
- whole lesions only: every image of a chosen `lesion_id` is included, so a split by lesion never leaks;
- stratified by diagnosis: each class gets a quota proportional to the square root of its frequency (so the rare
  classes are not swamped by `nv`), with at least `--min-per-class` images, adding up to about `--num-images`;
- lesions are drawn in a seeded random order within each class until the quota is reached.

Usage:
    python scripts/make_demo_sample.py --source ../shared/data/ham10000 --out scripts/demo_data/ham10000-sample
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

# numpy and pandas are imported after parsing, so `--help` answers at once.

REPO_ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]

ATTRIBUTION = """\
# HAM10000 demo sample: attribution and licence

The {num_images} dermoscopic images ({num_lesions} lesions), their lesion masks and metadata in this folder are a
subset of the HAM10000 dataset ("Human Against Machine with 10000 training images"), downscaled to 200x150 pixels
(masks resized with nearest-neighbour interpolation so they pair pixel-for-pixel with the images).

- Source: Harvard Dataverse, doi:10.7910/DVN/DBW86T (https://doi.org/10.7910/DVN/DBW86T).
- Licence: Creative Commons Attribution-NonCommercial 4.0 International (CC BY-NC 4.0),
  https://creativecommons.org/licenses/by-nc/4.0/. **Non-commercial use only.** See `LICENSE`.
- Cite: Tschandl, P., Rosendahl, C. & Kittler, H. The HAM10000 dataset, a large collection of multi-source
  dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018).
  https://doi.org/10.1038/sdata.2018.161
- Lesion masks: the HAM10000 reference segmentations published with the dataset (Tschandl et al.).
- Changes: images downscaled to 200x150, a subset selected by `scripts/make_demo_sample.py` (seed {seed}), no other
  changes.

The sample exists only so the demo command (`bash scripts/run.sh demo`) can train a toy model in a few minutes.
Models trained on it are demonstrations, not medical tools.

Classes in this sample (images / lesions):

{class_table}
"""

LICENSE = """\
The images, masks and metadata in this folder are a subset of the HAM10000 dataset
(Tschandl, Rosendahl & Kittler, Sci. Data 5, 180161 (2018); Harvard Dataverse doi:10.7910/DVN/DBW86T),
licensed under the Creative Commons Attribution-NonCommercial 4.0 International License (CC BY-NC 4.0).

You are free to share and adapt this material for non-commercial purposes, provided you give appropriate credit,
provide a link to the licence and indicate if changes were made.

Full licence text: https://creativecommons.org/licenses/by-nc/4.0/legalcode
This licence applies to the data in this folder only; the skin-dualnet code is licensed separately (Apache-2.0).
"""


def class_quotas(counts: pd.Series, num_images: int, min_per_class: int) -> dict[str, int]:
    """Images per class: proportional to sqrt(frequency), at least `min_per_class`, never more than available."""
    roots = {label: math.sqrt(count) for label, count in counts.items()}
    total = sum(roots.values())
    return {
        label: min(int(counts[label]), max(min_per_class, round(num_images * root / total)))
        for label, root in roots.items()
    }


def select_lesions(metadata: pd.DataFrame, num_images: int, min_per_class: int, seed: int) -> pd.DataFrame:
    """Rows of whole lesions, stratified by `dx` (see the module docstring)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lesions = metadata.groupby("lesion_id").agg(dx=("dx", "first"), size=("image_id", "size")).sort_index()
    if (metadata.groupby("lesion_id")["dx"].nunique() > 1).any():
        raise ValueError("Some lesion_id has images with different `dx`; cannot stratify whole lesions by class.")
    quotas = class_quotas(metadata["dx"].value_counts().sort_index(), num_images, min_per_class)
    chosen: list[str] = []
    for label in sorted(quotas):
        candidates = lesions[lesions["dx"] == label]
        order = rng.permutation(len(candidates))
        taken = 0
        for index in order:
            if taken >= quotas[label]:
                break
            chosen.append(candidates.index[index])
            taken += int(candidates["size"].iloc[index])
    selected = metadata[metadata["lesion_id"].isin(set(chosen))]
    return selected.sort_values(["dx", "lesion_id", "image_id"]).reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source",
        type=Path,
        default=REPO_ROOT.parent / "shared" / "data" / "ham10000",
        help="HAM10000 folder: images/, masks/ and HAM10000_metadata.csv (default: ../shared/data/ham10000).",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "scripts" / "demo_data" / "ham10000-sample",
        help="Folder to write; replaced if it exists (default: scripts/demo_data/ham10000-sample).",
    )
    parser.add_argument(
        "--num-images", type=int, default=300, help="About how many images to select (default: %(default)s)."
    )
    parser.add_argument(
        "--min-per-class", type=int, default=20, help="Fewest images of each class (default: %(default)s)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the lesion order (default: %(default)s).")
    args = parser.parse_args(argv)
    if args.num_images <= 0 or args.min_per_class <= 0:
        parser.error(
            f"--num-images and --min-per-class must be positive, got {args.num_images}, {args.min_per_class}."
        )
    import pandas as pd

    metadata_csv = args.source / "HAM10000_metadata.csv"
    if not metadata_csv.is_file():
        parser.error(f"--source must be a HAM10000 folder with HAM10000_metadata.csv, got {args.source}.")
    metadata = pd.read_csv(metadata_csv, dtype={"age": "float64"}, keep_default_na=False, na_values=[""])
    missing = [c for c in COLUMNS if c not in metadata.columns]
    if missing:
        parser.error(f"{metadata_csv} lacks the official HAM10000 columns {missing}.")
    # Only images that have both the image and the mask file can be bundled.
    has_files = metadata["image_id"].map(
        lambda i: (
            (args.source / "images" / f"{i}.jpg").is_file()
            and (args.source / "masks" / f"{i}_segmentation.png").is_file()
        )
    )
    complete_lesions = has_files.groupby(metadata["lesion_id"]).transform("all")
    metadata = metadata[complete_lesions].reset_index(drop=True)

    selected = select_lesions(metadata, args.num_images, args.min_per_class, args.seed)

    if args.out.exists():
        shutil.rmtree(args.out)
    (args.out / "images").mkdir(parents=True)
    (args.out / "masks").mkdir()
    for image_id in selected["image_id"]:
        shutil.copyfile(args.source / "images" / f"{image_id}.jpg", args.out / "images" / f"{image_id}.jpg")
        name = f"{image_id}_segmentation.png"
        shutil.copyfile(args.source / "masks" / name, args.out / "masks" / name)
    selected[COLUMNS].to_csv(args.out / "HAM10000_metadata.csv", index=False)

    table = selected.groupby("dx").agg(images=("image_id", "size"), lesions=("lesion_id", "nunique"))
    class_table = "\n".join(f"- {dx}: {row.images} / {row.lesions}" for dx, row in table.iterrows())
    (args.out / "ATTRIBUTION.md").write_text(
        ATTRIBUTION.format(
            num_images=len(selected),
            num_lesions=selected["lesion_id"].nunique(),
            seed=args.seed,
            class_table=class_table,
        )
    )
    (args.out / "LICENSE").write_text(LICENSE)
    print(f"Wrote {len(selected)} images of {selected['lesion_id'].nunique()} lesions to {args.out}")
    print(class_table)


if __name__ == "__main__":
    main()
