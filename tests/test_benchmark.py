"""`scripts/benchmark.py`: ratios and table from hand-made timings, a tiny run end to end, the checkpoint mode.

No timing is asserted: the machines are shared. The end-to-end run checks that every measurement is written and
finite, and compares what it can with values found independently (the saved checkpoint's size, the preset's sizes).
"""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import CHECKPOINT, PRESETS, REPO_ROOT, SCRIPTS, script_module, tiny_classifier

SCRIPT = SCRIPTS / "benchmark.py"

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
    "dataloader_ips",
]


@pytest.fixture(scope="module")
def benchmark():
    return script_module("benchmark.py", "benchmark_script")


def test_ratios_from_hand_made_timings(benchmark):
    timings = {"reference_ms": 10.0, "classifier_ms": 23.0, "segmenter_ms": 17.0, "explained_ms": 52.0}
    timings["naive_explained_ms"] = 130.0
    assert benchmark.overhead_ratios(timings) == pytest.approx(
        {"fusion_overhead_ratio": 1.15, "explain_overhead_ratio": 1.3, "naive_over_ours_ratio": 2.5}
    )


def test_markdown_table_rows(benchmark):
    results = {"preset": "tiny", "device": "cpu", "threads": 2, "torch": "2.x", "train_batch": 8}
    results |= {"reference_ms": 12.345, "explain_overhead_ratio": 1.2049, "compile_seconds": None}
    results["train_step_ips"] = {"classifier_tiny": 41.0}
    table = benchmark.markdown_table(results).splitlines()
    assert table[0] == "Preset `tiny` on cpu (2 threads), torch 2.x"
    assert "| bare timm encoder forward (batch 1), the unit | 12.3 | ms |" in table
    assert "| explained / (segmenter + classifier), target ≤ 1.3 | 1.2 |  |" in table
    assert "| training step, classifier tiny (batch 8) | 41 | img/s |" in table
    assert not any("torch.compile" in line for line in table)  # not measured, not printed
    assert len(table) == 4 + 3


def test_benchmark_refuses_cuda_without_gpu(benchmark, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        benchmark.main(["--preset", "tiny", "--device", "cuda", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_tiny_run_writes_every_measurement(data_root, tmp_path):
    out = tmp_path / "tiny.json"
    env = {**os.environ, "SKIN_DUALNET_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--out", str(out), "--repeats", "1", "--warmup", "0",
         "--train-presets", "tiny", "--dataloader-images", "16", "--dataloader-workers", "0"],
        capture_output=True, text=True, timeout=900, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    for key in REQUIRED:
        assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] > 0, key
    preset = json.loads((PRESETS / "skin-dualnet-tiny.json").read_text())
    assert results["preset"] == "tiny" and results["image_size"] == preset["image_size"]
    assert results["encoder"] == preset["encoder_name"]
    assert set(results["train_step_ips"]) == {"segmenter_tiny", "classifier_tiny"}
    assert all(value > 0 for value in results["train_step_ips"].values())
    # The loading measurement reads the tiny preset's checkpoint: the same size as one saved here.
    tiny_classifier().save_pretrained(tmp_path / "saved")
    size = (tmp_path / "saved" / "model.safetensors").stat().st_size / 2**20
    assert results["checkpoint_mb"] == pytest.approx(size, rel=1e-3)
    assert "| measurement | value | unit |" in run.stdout
    assert f"| {results['explain_overhead_ratio']:.3g} |" in run.stdout


@pytest.mark.slow
def test_benchmark_times_the_shipped_checkpoint_end_to_end(benchmark, data_root, tmp_path):
    """`--checkpoint`: image file -> result with mask and both heatmaps, one image and a batch of files (in this
    process: the mode loads a pipeline and times it, nothing process-wide)."""
    out = tmp_path / "checkpoint.json"
    benchmark.main(
        ["--checkpoint", str(CHECKPOINT), "--data-root", str(data_root), "--out", str(out), "--repeats", "1",
         "--warmup", "0", "--checkpoint-images", "2"]
    )  # fmt: skip
    results = json.loads(out.read_text())
    for key in ("end_to_end_explained_ms", "end_to_end_plain_ms", "throughput_explained_ips", "throughput_plain_ips"):
        assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] > 0, key
    for key in ("explained_with_trust_ms", "explained_without_trust_ms", "trust_arithmetic_ms"):
        assert math.isfinite(results[key]) and results[key] > 0, key  # the shipped checkpoint has a gate
    assert results["ood_overhead_ratio"] == pytest.approx(
        results["explained_with_trust_ms"] / results["explained_without_trust_ms"] - 1
    )
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert results["throughput_images"] == 2 and results["image_size"] == config["image_size"]
