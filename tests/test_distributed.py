"""A real two-process data-parallel job on the CPU (torchrun, gloo backend) for each training script: it finishes
and shuts its process group down cleanly, each training image is seen exactly once per epoch, and the validation
metrics gathered from both processes equal a single-process evaluation of the saved checkpoint."""

import json
import math
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SCRIPTS

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
sys.path.insert(0, str(SCRIPTS))  # the scripts' helpers (`_evaluation`)


def single_process_metrics(script: str, output_dir: Path, data_root: Path) -> dict:
    """The saved model of a run evaluated on its validation ids in this one process, with the scripts' own validation
    function. One thread and batches of one image, as in the job: CPU kernels may round differently otherwise (a 1e-8
    change in a probability, or a pixel flipping at the mask threshold)."""
    import torch
    from accelerate import Accelerator
    from transformers import AutoModel

    from modeling_skinlesion import SkinLesionImageProcessor, SkinLesionMetadataProcessor
    from modeling_skinlesion.data import SkinLesionTransform, build_dataloader, column_values, load_ham10000
    from modeling_skinlesion.training.evaluation import image_forward, validate_classifier, validate_segmenter

    ids = json.loads((output_dir / "splits.json").read_text())["validation"]
    dataset = load_ham10000(data_root, masks=True)
    position = {image_id: i for i, image_id in enumerate(column_values(dataset, "image_id"))}
    dataset = dataset.select([position[i] for i in ids])
    model = AutoModel.from_pretrained(output_dir)
    processor = SkinLesionImageProcessor.from_model_config(model.config)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if script == "segmenter":
            loader = build_dataloader(dataset, SkinLesionTransform(processor), batch_size=1)
            return validate_segmenter(model, loader, accelerator)
        metadata = SkinLesionMetadataProcessor.from_config(model.config)
        loader = build_dataloader(dataset, SkinLesionTransform(processor, metadata_processor=metadata), batch_size=1)
        return validate_classifier(model, loader, accelerator, lambda m, batch: image_forward(m, batch, False))
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_same_metrics(actual, expected, path: str = "") -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected), path
        for key in expected:
            assert_same_metrics(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, float):
        # Float32 logits computed in the training process can differ from a fresh process's by one rounding step
        # (the probabilities by ~1e-8); anything from a mis-sharded or duplicated image is orders of magnitude larger.
        assert actual == pytest.approx(expected, abs=1e-6), path
    else:
        assert actual == expected, path


@pytest.mark.parametrize("script", ["segmenter", "classifier"])
def test_two_process_cpu_job(script: str, data_root: Path, presets: Path, tmp_path: Path, in_process_run):
    preset = presets / ("segmenter-tiny.json" if script == "segmenter" else "skin-dualnet-tiny.json")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(SCRIPTS / f"train_{script}.py"),
        "--config", str(preset), "--dataset", "ham10000", "--data-root", str(data_root / "ham10000"),
        "--output-dir", str(tmp_path), "--epochs", "2", "--batch-size", "2",
        # 16 training images = 2 processes x batch 2 x 4 steps: nothing repeated to even out the last batch.
        # 13 validation images in batches of 1: the processes get 7 and 6 + 1 repeated to even out the batches, which
        # the gather must drop.
        "--max-train-samples", "16", "--max-eval-samples", "13", "--eval-batch-size", "1", "--log-samples",
    ]  # fmt: skip
    if script == "classifier":
        # The validation metrics are those of the best epoch before calibration; a temperature fitted afterwards
        # would change the saved model's probabilities (tests/test_training.py covers the calibration).
        command.append("--no-calibrate")
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "terminate called" not in result.stderr
    assert "destroy_process_group" not in result.stderr  # torch warns when a process group is left alive
    assert "2 process(es) x batch 2" in result.stdout

    # Each training image once per epoch, split between the two processes.
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert len(splits["train"]) == 16 and len(splits["validation"]) == 13
    seen: dict[tuple[int, int], list[str]] = {}
    for rank in (0, 1):
        for line in (tmp_path / "samples" / f"rank{rank}.tsv").read_text().splitlines():
            epoch, _, image_id = line.split("\t")
            seen.setdefault((int(epoch), rank), []).append(image_id)
    for epoch in (0, 1):
        first, second = seen[(epoch, 0)], seen[(epoch, 1)]
        assert len(first) == len(second) == 8
        counts = Counter(first + second)
        assert set(counts) == set(splits["train"]) and set(counts.values()) == {1}, epoch
    assert seen[(0, 0)] != seen[(1, 0)]  # reshuffled each epoch

    # Gathered validation metrics (best epoch, whose weights were saved) equal a one-process evaluation.
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 2 * math.ceil(16 / (2 * 2))
    gathered = metrics["best"]["validation"]
    assert gathered.get("num_images", gathered.get("num_samples")) == 13
    reference = single_process_metrics(script, tmp_path, data_root / "ham10000")
    assert_same_metrics(gathered, reference)
