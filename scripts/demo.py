"""The README's main command: launch the Space on the shipped checkpoint (or on a model you name, or on demo weights
it trains first).

    bash scripts/run.sh demo                       # the shipped checkpoint, checkpoints/skin-dualnet-small
    bash scripts/run.sh demo path/to/model         # a local folder (or a Hub id, online)
    bash scripts/run.sh demo --train-demo          # train demo weights (first run only), export, launch
    python scripts/demo.py --no-launch             # check that the model loads, do not launch

With no model argument the Space serves `checkpoints/skin-dualnet-small`, the release checkpoint in this repository
(trained on HAM10000 / ISIC 2017 on a CPU; its model card gives its test-split numbers). `--train-demo` is a check of
the training pipeline instead: it
1. trains the tiny segmenter preset, then the tiny classifier preset around it, with the project's training scripts
   (`scripts/train_segmenter.py`, `scripts/train_classifier.py`) on the bundled 314-image HAM10000 sample
   (`scripts/demo_data/ham10000-sample`, CC BY-NC 4.0), with fixed small budgets (a few minutes on 2 CPU cores);
2. exports a Hub-ready folder with `scripts/push_to_hub.py` into `outputs/demo-model`, whose model card says these are
   demo weights and gives the validation numbers, also written to `demo_run.json` (the marker of a complete export);
3. launches the Gradio Space (`space/app.py`) on that folder at http://127.0.0.1:7860.

Re-runs reuse a complete `outputs/demo-model` (pass `--retrain` to train again). Those weights are a demonstration of
the training software, trained on a few hundred small images: they are not a usable model for anything.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _model_source import REPO_ROOT, SHIPPED_MODEL, check_model_source  # noqa: E402

from modeling_skinlesion.cli import HelpFormatter  # noqa: E402

SCRIPTS = REPO_ROOT / "scripts"
SPACE = REPO_ROOT / "space"
SAMPLE = SCRIPTS / "demo_data" / "ham10000-sample"
SEGMENTER_PRESET = REPO_ROOT / "configuration" / "segmenter-tiny.json"
CLASSIFIER_PRESET = REPO_ROOT / "configuration" / "skin-dualnet-tiny.json"
DEMO_REPO_ID = "org/skin-dualnet-demo"
MARKER = "demo_run.json"
# Files a complete export holds besides the marker (the code files are checked by push_to_hub itself).
EXPORT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")

DEMO_NOTICE = (
    "tiny presets (64 px, timm test trunks, no ImageNet weights) trained for a few minutes on CPU on the "
    "{num_images}-image HAM10000 sample bundled with skin-dualnet (scripts/demo_data/ham10000-sample). They exist "
    "to try the software and are not a usable model: not for diagnosis, screening or any other use."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help=f"Hub id or local model folder to serve (default: the shipped {SHIPPED_MODEL.relative_to(REPO_ROOT)}).",
    )
    parser.add_argument(
        "--train-demo",
        action="store_true",
        help="Train tiny demo weights on the bundled sample (checks the training pipeline), export and serve them.",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=REPO_ROOT / "outputs" / "demo-model",
        help="Where the Hub-ready demo model is exported.",
    )
    training = parser.add_argument_group("demo training (with --train-demo)")
    training.add_argument("--work-dir", type=Path, help="Where the training runs go (default: <output-dir>-runs).")
    training.add_argument("--data-root", type=Path, default=SAMPLE, help="HAM10000-layout folder to train on.")
    training.add_argument("--segmenter-epochs", type=int, default=4, help="Epochs of the demo segmenter.")
    training.add_argument("--classifier-epochs", type=int, default=4, help="Epochs of the demo classifier.")
    training.add_argument("--classifier-lr", type=float, default=1e-3, help="Learning rate of the demo classifier.")
    training.add_argument("--max-steps", type=int, help="Cap on optimizer steps of each run (quick runs and tests).")
    training.add_argument("--batch-size", type=int, default=16, help="Batch size of both training runs.")
    training.add_argument("--seed", type=int, default=0, help="Seed of the training runs (split and initialisation).")
    parser.add_argument("--retrain", action="store_true", help="Train again even if a complete export exists.")
    parser.add_argument("--no-launch", action="store_true", help="Check the model loads (train/export it) only.")
    parser.add_argument("--host", default="127.0.0.1", help="Interface the Space listens on.")
    parser.add_argument("--port", type=int, default=7860, help="Port of the Space.")
    args = parser.parse_args(argv)
    for name in ("segmenter_epochs", "classifier_epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.classifier_lr <= 0:
        parser.error(f"--classifier-lr must be positive, got {args.classifier_lr}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.train_demo and args.model is not None:
        parser.error("give a model to serve or --train-demo, not both")
    if args.work_dir is None:
        args.work_dir = args.output_dir.with_name(args.output_dir.name + "-runs")
    return args


def banner(*lines: str) -> None:
    width = max(len(line) for line in lines) + 4
    print("\n" + "#" * width, flush=True)
    for line in lines:
        print(f"# {line.ljust(width - 4)} #", flush=True)
    print("#" * width + "\n", flush=True)


def is_complete(folder: Path) -> bool:
    """A demo export that finished: every export file plus the marker written last."""
    return (folder / MARKER).is_file() and all((folder / name).is_file() for name in EXPORT_FILES)


def best_validation(run_dir: Path) -> dict[str, Any]:
    """The best epoch's validation scores from a training script's metrics.json."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = metrics.get("best") or {}
    return {
        "selected_by": best.get("metric"),
        "epoch": best.get("epoch") + 1 if isinstance(best.get("epoch"), int) else None,
        "steps": metrics.get("steps"),
        "wall_time_s": metrics.get("wall_time_s"),
        "split": metrics.get("split"),
        "validation": best.get("validation") or {},
    }


def run_training(script: str, arguments: list[str]) -> None:
    """Run one of the project's training scripts in a child process (offline: the tiny presets need no download)."""
    command = [sys.executable, str(SCRIPTS / script), *arguments]
    print("$ " + " ".join(command), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{script} failed with exit status {result.returncode}; see its log above.")


def train(args: argparse.Namespace) -> tuple[Path, Path]:
    """Segmenter, then the classifier with that segmenter inside. Returns both run folders."""
    if not (args.data_root / "HAM10000_metadata.csv").is_file():
        raise SystemExit(f"--data-root {args.data_root} holds no HAM10000_metadata.csv (HAM10000 layout expected).")
    common = ["--dataset", "ham10000", "--data-root", str(args.data_root), "--seed", str(args.seed)]
    common += f"--batch-size {args.batch_size} --checkpointing-steps none".split()
    if args.max_steps is not None:
        common += ["--max-steps", str(args.max_steps)]
    segmenter_dir = args.work_dir / "segmenter"
    classifier_dir = args.work_dir / "classifier"
    segmenter = ["--config", str(SEGMENTER_PRESET), "--output-dir", str(segmenter_dir)]
    run_training("train_segmenter.py", [*segmenter, "--epochs", str(args.segmenter_epochs), *common])
    classifier = ["--config", str(CLASSIFIER_PRESET), "--segmenter", str(segmenter_dir)]
    # From scratch, the tiny classifier barely moves at the scripts' default 3e-4 within a few epochs.
    classifier += ["--output-dir", str(classifier_dir), "--epochs", str(args.classifier_epochs)]
    classifier += ["--lr", str(args.classifier_lr)]
    run_training("train_classifier.py", [*classifier, *common])
    return segmenter_dir, classifier_dir


def export_model(
    model_path: Path, output_dir: Path, datasets: list[str], training: dict[str, Any] | None = None
) -> Path:
    """Export a trained classifier folder as a Hub-ready folder with `scripts/push_to_hub.py` (the project's export),
    then, with `training` facts, rewrite its model card to state them under "Training data"."""
    sys.path.insert(0, str(SCRIPTS))
    import push_to_hub

    argv = [
        "--model_path",
        str(model_path),
        "--output_dir",
        str(output_dir),
        "--repo_id",
        DEMO_REPO_ID,
        "--datasets",
        *datasets,
    ]
    metrics_file = Path(model_path) / "metrics.json"
    if metrics_file.is_file():
        argv += ["--metrics_file", str(metrics_file)]
    status = push_to_hub.main(argv)
    if status != 0:
        raise SystemExit(f"scripts/push_to_hub.py failed with exit status {status}; see its log above.")
    if training:
        from transformers import AutoConfig

        from modeling_skinlesion.model_card import load_metrics, write_model_card

        write_model_card(
            output_dir,
            AutoConfig.from_pretrained(output_dir),
            repo_id=DEMO_REPO_ID,
            datasets=datasets,
            metrics=load_metrics(metrics_file) if metrics_file.is_file() else None,
            training=training,
        )
    return output_dir


def describe(record: dict[str, Any]) -> list[str]:
    """Human-readable validation lines of a demo run record."""
    lines = []
    for name, keys in (("segmenter", ("dice", "jaccard")), ("classifier", ("balanced_accuracy", "accuracy"))):
        run = record.get(name) or {}
        scores = run.get("validation") or {}
        shown = ", ".join(f"{key} {scores[key]:.3f}" for key in keys if isinstance(scores.get(key), (int, float)))
        images = (run.get("split") or {}).get("validation", {}).get("images")
        lines.append(f"{name} validation ({images} images, best of {run.get('steps')} steps): {shown or 'n/a'}")
    return lines


def train_and_export(args: argparse.Namespace) -> dict[str, Any]:
    start = time.monotonic()
    num_images = sum(1 for _ in (args.data_root / "images").glob("*.jpg"))
    banner(
        f"Training DEMO weights on {num_images} bundled HAM10000 images (a few minutes on CPU).",
        f"Runs: {args.work_dir}    Export: {args.output_dir}",
    )
    if args.output_dir.exists() and (args.output_dir / MARKER).exists():
        (args.output_dir / MARKER).unlink()  # an interrupted re-export must not look complete
    segmenter_dir, classifier_dir = train(args)
    record = {
        "demo": True,
        "notice": DEMO_NOTICE.format(num_images=num_images),
        "data_root": os.path.relpath(args.data_root, REPO_ROOT),
        "num_images": num_images,
        "presets": [SEGMENTER_PRESET.name, CLASSIFIER_PRESET.name],
        "segmenter": best_validation(segmenter_dir),
        "classifier": best_validation(classifier_dir),
    }
    seg, cls = record["segmenter"]["validation"], record["classifier"]["validation"]
    training = {
        "DEMO WEIGHTS": record["notice"][0].upper() + record["notice"][1:],
        "Segmenter validation Dice / Jaccard": f"{seg.get('dice', float('nan')):.4f} / "
        f"{seg.get('jaccard', float('nan')):.4f} ({seg.get('num_images', '?')} images)",
        "Classifier validation balanced accuracy": f"{cls.get('balanced_accuracy', float('nan')):.4f}",
    }
    export_model(classifier_dir, args.output_dir, ["ham10000"], training)
    record["train_and_export_s"] = round(time.monotonic() - start, 1)
    (args.output_dir / MARKER).write_text(json.dumps(record, indent=2))  # written last: marks the export complete
    return record


def check_source(model: str) -> None:
    """Fail in seconds, with one line, for a model that is neither a folder nor reachable on the Hub."""
    try:
        check_model_source(model)
    except ValueError as error:
        raise SystemExit(str(error)) from None


def load_space_model(model: str) -> tuple[Any, Any]:
    """The Space module (`space/app.py`) and `model` loaded by it, as the Space will serve it."""
    sys.path.insert(0, str(SPACE))
    os.environ["SKIN_DUALNET_MODEL"] = model
    import app

    return app, app.get_model(model)


def launch(model: str, host: str, port: int, demo_record: dict[str, Any] | None) -> None:
    app, loaded = load_space_model(model)
    if demo_record:
        banner(
            "THESE ARE DEMO WEIGHTS, trained for a few minutes on a few hundred images.",
            "They are NOT a usable model: not for diagnosis, screening or any other use.",
            *describe(demo_record),
        )
    if not loaded.ok:
        raise SystemExit(
            f"The model {model!r} could not be loaded ({loaded.error.splitlines()[0]}); not launching a Space that "
            f"cannot predict. Serve the shipped checkpoint ({SHIPPED_MODEL.relative_to(REPO_ROOT)}) or a local folder."
        )
    if not demo_record:
        banner(f"Serving {model}", "Research software, not a medical device.", *loaded.test_summary.splitlines())
    print(f"Space on http://{host}:{port}  (model: {model}; Ctrl+C to stop)", flush=True)
    app.build(model).launch(server_name=host, server_port=port, **app.launch_options())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.train_demo:
        model = args.model or str(SHIPPED_MODEL)
        marker = Path(model) / MARKER
        record = json.loads(marker.read_text()) if marker.is_file() else None
    else:
        model = str(args.output_dir)
        if is_complete(args.output_dir) and not args.retrain:
            record = json.loads((args.output_dir / MARKER).read_text())
            print(f"Reusing the demo weights in {args.output_dir} (pass --retrain to train again).", flush=True)
        else:
            record = train_and_export(args)
        banner(f"Demo model ready in {args.output_dir}:", *describe(record))
    check_source(model)  # an unreachable id fails here, in seconds, with one line
    if args.no_launch:
        if not args.train_demo:  # check that the Space can load it
            _, loaded = load_space_model(model)
            print(f"Model {model}: {'loads' if loaded.ok else 'cannot be loaded: ' + str(loaded.error)}", flush=True)
            return 0 if loaded.ok else 1
        return 0
    launch(model, args.host, args.port, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
