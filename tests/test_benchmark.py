"""`scripts/benchmark.py` runs as one command and writes every key issue 5 asks for (tiny preset, few repeats).

No timing is asserted: the machines are shared. The test checks the JSON is complete and internally consistent (each
ratio is the quotient of the timings written beside it) and that the Markdown table is printed.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark.py"

REQUIRED = [
    "reference_ms",
    "segmenter_ms",
    "classifier_ms",
    "explained_ms",
    "naive_explained_ms",
    "fusion_overhead_ratio",
    "explain_overhead_ratio",
    "naive_over_ours_ratio",
    "throughput_batch8_ips",
    "throughput_batch32_ips",
    "peak_rss_mb",
    "load_seconds",
    "load_peak_memory_ratio",
    "train_step_ips",
    "dataloader_ips",
]


@pytest.fixture(scope="module")
def tiny_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    env = {**os.environ, "SKIN_DUALNET_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--out", str(out), "--repeats", "2", "--warmup", "1",
         "--train-presets", "tiny", "--dataloader-images", "32", "--dataloader-workers", "0"],
        capture_output=True, text=True, timeout=900, env=env, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


@pytest.mark.slow
def test_benchmark_writes_every_key_and_consistent_ratios(tiny_run):
    results, _ = tiny_run
    missing = [key for key in REQUIRED if key not in results]
    assert not missing, missing
    for key in REQUIRED:
        if key != "train_step_ips":
            assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] > 0, key
    assert results["device"] and results["preset"] == "tiny"
    assert results["fusion_overhead_ratio"] == pytest.approx(results["classifier_ms"] / (2 * results["reference_ms"]))
    assert results["explain_overhead_ratio"] == pytest.approx(
        results["explained_ms"] / (results["segmenter_ms"] + results["classifier_ms"])
    )
    assert results["naive_over_ours_ratio"] == pytest.approx(results["naive_explained_ms"] / results["explained_ms"])
    assert set(results["train_step_ips"]) == {"segmenter_tiny", "classifier_tiny"}
    assert all(value > 0 for value in results["train_step_ips"].values())
    assert 0 < results["checkpoint_mb"] < 20


@pytest.mark.slow
def test_benchmark_prints_markdown_table(tiny_run):
    results, stdout = tiny_run
    assert "| measurement | value | unit |" in stdout
    assert "explained / (segmenter + classifier)" in stdout
    assert f"{results['explain_overhead_ratio']:.3g}" in stdout


def test_benchmark_refuses_cuda_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--device", "cuda", "--out", str(tmp_path / "x.json")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert result.returncode != 0
    assert "no CUDA device" in result.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_benchmark_times_the_shipped_checkpoint_end_to_end(data_root, tmp_path):
    """`--checkpoint`: image file -> result with mask and both heatmaps, one image and a batch of files."""
    out = tmp_path / "checkpoint.json"
    env = {**os.environ, "SKIN_DUALNET_DATA": str(data_root)}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpoint", str(REPO / "checkpoints" / "skin-dualnet-small"), "--out",
         str(out), "--repeats", "2", "--warmup", "1", "--checkpoint-images", "4"],
        capture_output=True, text=True, timeout=900, env=env, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    for key in ("end_to_end_explained_ms", "end_to_end_plain_ms", "throughput_explained_ips", "throughput_plain_ips"):
        assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] > 0, key
    assert results["throughput_images"] == 4 and results["image_size"] == 192
