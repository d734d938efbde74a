"""Wall time of fine-tuning on a clinic, as a user runs it: `python scripts/finetune.py ... --freeze-encoders`, set-up
included (imports, loading the checkpoint, the split and file check, the working copies, the feature cache,
calibration, saving), with the feature cache and without it (`--no-cache-features`: every step runs the images).

    python benchmarks/finetune_timing.py --checkpoint checkpoints/skin-dualnet-small \
        --isic2017-root ../shared/data/isic2017 --out benchmarks/finetune-timing.json

The clinic: `--train-images` training images plus a fifth as many for validation, from the shared ISIC 2017 copy
(768 px JPEGs of other centres, naevus / melanoma), as a folder + CSV. Run it alone on the machine: the figure is
wall time on the cores there are. Target (issue 21): 100 training images x 5 epochs in at most 2 minutes on 2 cores.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(REPO_ROOT / "checkpoints" / "skin-dualnet-small"))
    parser.add_argument("--isic2017-root", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "isic2017")
    parser.add_argument("--train-images", type=int, default=100, help="Training images (validation: a fifth more).")
    parser.add_argument("--epochs", type=int, default=5, help="Epochs of the cached run.")
    parser.add_argument("--uncached-epochs", type=int, default=5, help="Epochs of the uncached run (0: skip it).")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "finetune-timing.json")
    args = parser.parse_args()

    import pandas as pd

    manifest = pd.read_csv(args.isic2017_root / "manifest.csv", dtype={"image_id": str})
    total = args.train_images + args.train_images // 4  # val-size 0.2 of the total: 100 train + 25 validation
    chosen = manifest.sample(n=total, random_state=0)
    work = Path(tempfile.mkdtemp(prefix="finetune-timing-"))
    (work / "photos").mkdir()
    for image_id in chosen["image_id"]:
        shutil.copy(args.isic2017_root / "images" / f"{image_id}.jpg", work / "photos")
    pd.DataFrame(
        {
            "file": chosen["image_id"] + ".jpg",
            "diagnosis": chosen["diagnosis"].map({"melanoma": "mel", "nevus": "nv"}),
            "age": chosen["age_approx"],
            "sex": chosen["sex"],
        }
    ).to_csv(work / "cases.csv", index=False)
    common = [
        sys.executable, str(REPO_ROOT / "scripts" / "finetune.py"), "--checkpoint", args.checkpoint,
        "--images", str(work / "photos"), "--csv", str(work / "cases.csv"),
        "--column-map", "image=file", "label=diagnosis", "age=age", "sex=sex", "--freeze-encoders",
        "--val-size", "0.2", "--checkpointing-steps", "none",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = {}
    plan = [("cached", args.epochs, [])]
    if args.uncached_epochs:
        plan.append(("uncached", args.uncached_epochs, ["--no-cache-features"]))
    for name, epochs, extra in plan:
        output = work / name
        command = [*common, "--epochs", str(epochs), "--output-dir", str(output), *extra]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{name} run failed:\n{done.stderr[-3000:]}")
        metrics = json.loads((output / "metrics.json").read_text())
        runs[name] = {
            "epochs": epochs,
            "wall_s": wall,
            "train_images": metrics["split"]["train"]["images"],
            "validation_images": metrics["split"]["validation"]["images"],
            "kept_starting_model": metrics["kept_starting_model"],
            "validation_before": metrics["before"]["balanced_accuracy"],
            "validation_after": metrics["after"]["balanced_accuracy"],
        }
        print(f"{name}: {epochs} epochs in {wall:.1f} s")
    if "uncached" in runs and runs["uncached"]["epochs"] == runs["cached"]["epochs"]:
        runs["uncached_over_cached"] = runs["uncached"]["wall_s"] / runs["cached"]["wall_s"]
    result = {
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "checkpoint": args.checkpoint,
        "clinic": f"{total} ISIC 2017 images (768 px JPEGs), naevus / melanoma, folder + CSV",
        "target": "100 training images x 5 epochs, frozen encoders, <= 120 s wall on 2 cores, set-up included",
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
