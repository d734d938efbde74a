"""Benchmark skin-dualnet: forward costs, the price of an explanation, throughput, memory, loading and training.

    python scripts/benchmark.py --out benchmarks/cpu.json            # paper-sized presets, random weights
    python scripts/benchmark.py --out /tmp/tiny.json --preset tiny    # seconds; what the test suite runs
    python scripts/benchmark.py --out benchmarks/checkpoint.json --checkpoint checkpoints/skin-dualnet-small

Writes a JSON file and prints a Markdown table. Every ratio is computed from timings taken in the same process, so
they compare like with like on a noisy shared machine; absolute milliseconds are only indicative.
"""

from __future__ import annotations  # annotations name torch types that are imported only after parsing

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

# torch, timm, transformers and the package are imported inside the functions that use them, so `--help` and usage
# errors answer at once.

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    "paper": ("segmenter.json", "skin-dualnet.json"),
    "tiny": ("segmenter-tiny.json", "skin-dualnet-tiny.json"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write.")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="paper", help="Model sizes to time (default: %(default)s)."
    )
    parser.add_argument(
        "--device", default="auto", help="'auto' (cuda when present), 'cpu' or 'cuda' (default: %(default)s)."
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="Timed repetitions per measurement, median kept (default: %(default)s)."
    )
    parser.add_argument("--warmup", type=int, default=2, help="Untimed repetitions first (default: %(default)s).")
    parser.add_argument(
        "--throughput-batches",
        type=int,
        nargs="+",
        default=[8, 32],
        metavar="N",
        help="Batch sizes of the throughput measurement (default: 8 32).",
    )
    parser.add_argument(
        "--train-batch",
        type=int,
        default=8,
        help="Batch size of the training-step measurement (default: %(default)s).",
    )
    parser.add_argument(
        "--train-presets",
        nargs="+",
        choices=sorted(PRESETS),
        default=["tiny", "paper"],
        help="Presets whose training step is timed (default: tiny paper).",
    )
    parser.add_argument("--compile", action="store_true", help="Also time a torch.compile'd classifier forward.")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="Time this trained classifier end to end instead of the presets: image file -> result with mask and "
        "both heatmaps through pipeline('skin-lesion-analysis'), one image at a time and as a batch of files "
        "(default: none, time the presets).",
    )
    parser.add_argument(
        "--checkpoint-images",
        type=int,
        default=32,
        help="Image files in the --checkpoint throughput run (default: %(default)s).",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=Path(os.environ.get("SKIN_DUALNET_DATA", REPO.parent / "shared" / "data")),
        help="Real data for the data-loader and --checkpoint measurements, HAM10000 layout under <root>/ham10000 "
        "(default: $SKIN_DUALNET_DATA, else ../shared/data).",
    )
    parser.add_argument(
        "--dataloader-images", type=int, default=256, help="Images through the data loader (default: %(default)s)."
    )
    parser.add_argument(
        "--dataloader-workers", type=int, default=2, help="Data-loader worker processes (default: %(default)s)."
    )
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of `fn` in milliseconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Median wall time in milliseconds of each function, timed round-robin (one call of each per round)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def autocast_context(device: torch.device):
    """bf16 autocast on a GPU (fp16 where bf16 is missing); nothing on the CPU."""
    import torch

    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lesion_photo(height: int = 450, width: int = 600) -> Image.Image:
    """A dermoscopy-sized stand-in: skin tone, a dark irregular blob, noise (content does not change timings)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width]
    radius = min(height, width) / 4 * (1 + 0.15 * np.sin(np.arctan2(ys - height / 2, xs - width / 2) * 5))
    blob = (ys - height / 2) ** 2 + (xs - width / 2) ** 2 < radius**2
    array = np.where(blob[..., None], [90, 55, 45], [205, 165, 145]).astype(np.float32)
    return Image.fromarray(np.clip(array + rng.normal(0, 10, array.shape), 0, 255).astype(np.uint8))


def measure_loading(folder: Path) -> dict[str, float]:
    """`from_pretrained` in a fresh process: seconds, and peak resident memory added while loading divided by the
    safetensors file size (sampled every millisecond from /proc); then the resident memory added once every weight
    has been read (memory-mapped pages count only when touched), divided by the same size."""
    code = f"""
import json, threading, time
import modeling_skinlesion
from transformers import AutoModel
modeling_skinlesion.register()

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

peak = [rss()]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)

baseline = rss()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
model = AutoModel.from_pretrained({str(folder)!r})
seconds = time.perf_counter() - start
stop.set()
thread.join()
peak[0] = max(peak[0], rss())
# Memory-mapped weight pages count as resident only once read: read every tensor once and measure again.
import torch
with torch.no_grad():
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.float().sum()
touched = rss()
print(json.dumps({{"seconds": seconds, "added_bytes": peak[0] - baseline, "touched_bytes": touched - baseline}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    size = (folder / "model.safetensors").stat().st_size
    return {
        "load_seconds": measured["seconds"],
        "load_peak_memory_mb": measured["added_bytes"] / 2**20,
        "load_peak_memory_ratio": measured["added_bytes"] / size,
        "load_resident_after_reading_weights_ratio": measured["touched_bytes"] / size,
        "checkpoint_mb": size / 2**20,
    }


def train_step_ips(model: torch.nn.Module, make_batch: Callable[[], dict], batch: int, device, repeats: int) -> float:
    """Images per second of full training steps (forward, backward, AdamW step)."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = make_batch()

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        optimizer.step()

    milliseconds = time_ms(step, device, repeats=repeats, warmup=1)
    model.eval()
    return batch / (milliseconds / 1000)


def measure_dataloader(root: Path, processor, images: int, workers: int) -> float | None:
    """Images per second out of the training data pipeline (decode, joint augmentation, collate)."""
    if not (root / "ham10000").is_dir():
        return None
    from modeling_skinlesion import data

    dataset = data.load_ham10000(root / "ham10000")
    dataset = dataset.select(range(min(images, len(dataset))))
    transform = data.SkinLesionTransform(processor, train=True)
    loader = data.build_dataloader(dataset, transform, batch_size=32, shuffle=True, num_workers=workers)
    start = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += batch["pixel_values"].shape[0]
    return seen / (time.perf_counter() - start)


def trust_overhead(args: argparse.Namespace, analyse, file: Path, record: dict, device) -> dict[str, float]:
    """What the out-of-distribution gate and the referral point cost an explained prediction: the same checkpoint
    with and without them (a second copy with the gate, the malignant classes and the threshold removed), timed
    round-robin; `ood_overhead_ratio` = with / without - 1. Also the gate + referral arithmetic alone on one image."""
    import torch
    from transformers import pipeline

    bare = pipeline("skin-lesion-analysis", model=str(args.checkpoint), trust_remote_code=True, device=device)
    bare.model.ood_gate = None
    bare.model.config.referral_threshold = None
    bare.model.config.malignant_labels = []
    timings = time_interleaved(
        {
            "explained_with_trust_ms": lambda: analyse(str(file), metadata=record),
            "explained_without_trust_ms": lambda: bare(str(file), metadata=record),
        },
        device,
        args.repeats,
        args.warmup,
    )
    gate = analyse.model.ood_gate
    features = torch.randn(1, gate.means.shape[1], device=device) if gate is not None else None
    logits = torch.randn(1, analyse.model.config.num_labels, device=device)
    malignant = [analyse.model.config.label2id[name] for name in analyse.model.config.malignant_labels]

    def arithmetic() -> tuple:
        trusted = gate(features) <= analyse.model.config.ood_threshold if gate is not None else None
        return trusted, logits.softmax(-1)[:, malignant].sum(-1) >= (analyse.model.config.referral_threshold or 0.0)

    timings["trust_arithmetic_ms"] = time_ms(arithmetic, device, 200, 10)
    timings["ood_overhead_ratio"] = timings["explained_with_trust_ms"] / timings["explained_without_trust_ms"] - 1
    timings["trust_arithmetic_share_of_explained"] = (
        timings["trust_arithmetic_ms"] / timings["explained_with_trust_ms"]
    )
    return timings


def benchmark_checkpoint(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """End-to-end latency and throughput of a trained checkpoint through the analysis pipeline, from image files."""
    import torch
    from transformers import pipeline

    import modeling_skinlesion

    modeling_skinlesion.register()  # registers the "skin-lesion-analysis" pipeline

    start = time.perf_counter()
    analyse = pipeline("skin-lesion-analysis", model=str(args.checkpoint), trust_remote_code=True, device=device)
    load_seconds = time.perf_counter() - start
    files = sorted((args.data_root / "ham10000").glob("images/*.jpg"))[: args.checkpoint_images]
    if not files:
        raise SystemExit(f"No images under {args.data_root}/ham10000/images for the --checkpoint run.")
    record = {"age": 55, "sex": "female", "site": "back"}

    def one(explain: bool) -> Callable[[], object]:
        return lambda: analyse(str(files[0]), metadata=record, explain=explain)

    results: dict[str, object] = {
        "checkpoint": str(args.checkpoint),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "image_size": analyse.model.config.image_size,
        "pipeline_load_seconds": load_seconds,
    }
    results.update(
        time_interleaved(
            {"end_to_end_explained_ms": one(True), "end_to_end_plain_ms": one(False)},
            device,
            args.repeats,
            args.warmup,
        )
    )
    if analyse.model.ood_gate is not None or analyse.model.config.referral_threshold is not None:
        results.update(trust_overhead(args, analyse, files[0], record, device))
    for explain in (True, False):
        inputs = [{"image": str(path), "metadata": record} for path in files]
        analyse(inputs[:2], explain=explain, batch_size=8)  # warm-up
        start = time.perf_counter()
        analyse(inputs, explain=explain, batch_size=8)
        name = "explained" if explain else "plain"
        results[f"throughput_{name}_ips"] = len(files) / (time.perf_counter() - start)
    results["throughput_images"] = len(files)
    results["peak_rss_mb"] = peak_rss_mb()
    return results


def overhead_ratios(timings: dict[str, float]) -> dict[str, float]:
    """The ratios the targets are stated in, from timings taken in the same process: the fusion's cost over two bare
    encoders, an explained prediction over segment + classify, and pytorch-grad-cam per branch over ours."""
    return {
        "fusion_overhead_ratio": timings["classifier_ms"] / (2 * timings["reference_ms"]),
        "explain_overhead_ratio": timings["explained_ms"] / (timings["segmenter_ms"] + timings["classifier_ms"]),
        "naive_over_ours_ratio": timings["naive_explained_ms"] / timings["explained_ms"],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import timm
    import torch
    from transformers import AutoConfig, AutoModel

    import modeling_skinlesion as sl

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for, but torch sees no CUDA device here.")
    if args.checkpoint is not None:
        results = benchmark_checkpoint(args, device)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        return
    segmenter_preset, classifier_preset = PRESETS[args.preset]
    config = AutoConfig.from_pretrained(REPO / "configuration" / classifier_preset)
    torch.manual_seed(0)
    model = sl.SkinDualNet(config).eval().to(device)
    size = config.image_size
    seg_size = config.segmenter_config.image_size
    results: dict[str, object] = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "image_size": size,
        "segmenter_image_size": seg_size,
        "encoder": config.encoder_name,
        "segmenter_encoder": config.segmenter_config.encoder_name,
        "repeats": args.repeats,
    }
    pixel_values = torch.randn(1, 3, size, size, device=device)
    mask = torch.zeros(1, 1, size, size, device=device)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    metadata = {
        "age": torch.tensor([55.0], device=device),
        "sex_ids": torch.tensor([1], device=device),
        "site_ids": torch.tensor([2], device=device),
    }
    reference = timm.create_model(config.encoder_name, pretrained=False).eval().to(device)
    memory_format = torch.channels_last
    reference = reference.to(memory_format=memory_format)
    # The same weights in the default (contiguous) layout, to show whether channels_last helps on this device.
    model_contiguous = copy.deepcopy(model).eval()
    model = model.to(memory_format=memory_format)

    def inference(fn: Callable[[], object]) -> Callable[[], object]:
        def wrapped():
            with torch.inference_mode(), autocast_context(device):
                return fn()

        return wrapped

    # One explained prediction from a PIL image: pre-process, segment, classify, Grad-CAM on both branches, overlays.
    photo = lesion_photo()
    record = {"age": 55, "sex": "female", "anatom_site_general": "anterior torso"}
    processor = sl.SkinLesionImageProcessor.from_model_config(config)
    fast = sl.SkinLesionAnalyzer(model, processor, explain_backend="fast", device=device)
    naive = sl.SkinLesionAnalyzer(model, processor, explain_backend="library", device=device)
    seg_input = torch.randn(1, 3, seg_size, seg_size, device=device)
    pixel_values_cl = pixel_values.contiguous(memory_format=memory_format)
    # Interleaved: every round runs each measurement once, so load changes on a shared machine hit all of them alike
    # and the ratios below compare like with like.
    results.update(
        time_interleaved(
            {
                "reference_ms": inference(lambda: reference(pixel_values_cl)),
                "reference_contiguous_input_ms": inference(lambda: reference(pixel_values)),
                "segmenter_ms": inference(lambda: model.segmenter(pixel_values=seg_input)),
                "classifier_ms": inference(lambda: model(pixel_values=pixel_values, lesion_mask=mask, **metadata)),
                "classifier_contiguous_ms": inference(
                    lambda: model_contiguous(pixel_values=pixel_values, lesion_mask=mask, **metadata)
                ),
                "full_forward_ms": inference(lambda: model(pixel_values=pixel_values, **metadata)),
                "plain_prediction_ms": lambda: fast(photo, metadata=record, explain=False),
                "explained_ms": lambda: fast(photo, metadata=record),
                "naive_explained_ms": lambda: naive(photo, metadata=record),
            },
            device,
            args.repeats,
            args.warmup,
        )
    )
    model_contiguous = None  # free the copy
    with torch.inference_mode(), autocast_context(device):
        for batch in args.throughput_batches:
            images = torch.randn(batch, 3, size, size, device=device)
            batch_metadata = {k: v.expand(batch) for k, v in metadata.items()}
            milliseconds = time_ms(
                lambda images=images, m=batch_metadata: model(pixel_values=images, **m),
                device,
                max(1, args.repeats // 2),
                1,
            )
            results[f"throughput_batch{batch}_ips"] = batch / (milliseconds / 1000)

    def run(fn):
        return time_ms(fn, device, args.repeats, args.warmup)

    if args.compile:
        start = time.perf_counter()
        compiled = torch.compile(model)
        with torch.inference_mode():
            compiled(pixel_values=pixel_values, lesion_mask=mask, **metadata)
        results["compile_seconds"] = time.perf_counter() - start
        with torch.inference_mode():
            results["compiled_classifier_ms"] = run(
                lambda: compiled(pixel_values=pixel_values, lesion_mask=mask, **metadata)
            )

    results.update(overhead_ratios(results))

    # Training steps, tiny and paper presets (fresh models: the measurement trains them).
    train_batch = args.train_batch
    for preset_name in args.train_presets:
        seg_file, cls_file = PRESETS[preset_name]
        for kind, file in (("segmenter", seg_file), ("classifier", cls_file)):
            cfg = AutoConfig.from_pretrained(REPO / "configuration" / file)
            net = AutoModel.from_config(cfg).to(device)
            side = cfg.image_size
            if kind == "segmenter":

                def make_batch(side=side):
                    labels = torch.zeros(train_batch, 1, side, side, device=device)
                    labels[..., side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1
                    return {"pixel_values": torch.randn(train_batch, 3, side, side, device=device), "labels": labels}
            else:

                def make_batch(side=side, cfg=cfg):
                    lesion = torch.zeros(train_batch, 1, side, side, device=device)
                    lesion[..., side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1
                    return {
                        "pixel_values": torch.randn(train_batch, 3, side, side, device=device),
                        "lesion_mask": lesion,
                        "labels": torch.arange(train_batch, device=device) % cfg.num_labels,
                    }

            repeats = 2 if preset_name == "paper" and device.type == "cpu" else args.repeats
            results[f"train_step_ips_{kind}_{preset_name}"] = train_step_ips(
                net, make_batch, train_batch, device, repeats
            )
            del net
    results["train_step_ips"] = {
        k.removeprefix("train_step_ips_"): v for k, v in results.items() if k.startswith("train_step_ips_")
    }
    results["train_batch"] = train_batch

    results["dataloader_ips"] = measure_dataloader(
        args.data_root, processor, args.dataloader_images, args.dataloader_workers
    )

    with tempfile.TemporaryDirectory() as folder:
        model.to("cpu").save_pretrained(folder)
        results.update(measure_loading(Path(folder)))

    results["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        results["max_gpu_memory_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown_table(results))


def markdown_table(results: dict) -> str:
    rows = [
        ("reference_ms", "bare timm encoder forward (batch 1), the unit", "ms"),
        ("segmenter_ms", "segmenter forward", "ms"),
        ("classifier_ms", "classifier forward (both branches, fusion, metadata; mask given)", "ms"),
        ("classifier_contiguous_ms", "the same in the contiguous (NCHW) layout, not channels_last", "ms"),
        ("reference_contiguous_input_ms", "bare encoder forward, NCHW input to the channels_last model", "ms"),
        ("full_forward_ms", "segment + classify", "ms"),
        ("plain_prediction_ms", "plain prediction from a PIL image (no explanation)", "ms"),
        ("explained_ms", "explained prediction (ours: one forward, gradients to the hooked layers only)", "ms"),
        ("naive_explained_ms", "explained prediction, pytorch-grad-cam per branch", "ms"),
        ("fusion_overhead_ratio", "classifier / (2 × reference), target ≤ 1.15", ""),
        ("explain_overhead_ratio", "explained / (segmenter + classifier), target ≤ 1.3", ""),
        ("naive_over_ours_ratio", "naive / ours", ""),
        ("throughput_batch8_ips", "throughput (segment + classify), batch 8", "img/s"),
        ("throughput_batch32_ips", "throughput (segment + classify), batch 32", "img/s"),
        ("peak_rss_mb", "peak resident memory", "MB"),
        ("max_gpu_memory_allocated_mb", "max GPU memory allocated", "MB"),
        ("load_seconds", "from_pretrained", "s"),
        ("load_peak_memory_ratio", "from_pretrained peak memory / safetensors size, target ≤ 1.5", ""),
        ("load_resident_after_reading_weights_ratio", "resident memory once every weight was read / size", ""),
        ("dataloader_ips", "data loader (decode + augment + collate)", "img/s"),
        ("compile_seconds", "torch.compile time", "s"),
        ("compiled_classifier_ms", "compiled classifier forward", "ms"),
    ]
    lines = [
        f"Preset `{results['preset']}` on {results['device']} ({results['threads']} threads), "
        f"torch {results['torch']}",
        "",
        "| measurement | value | unit |",
        "| --- | ---: | --- |",
    ]
    for key, label, unit in rows:
        value = results.get(key)
        if value is not None:
            lines.append(f"| {label} | {value:.3g} | {unit} |")
    for key, value in results["train_step_ips"].items():
        lines.append(
            f"| training step, {key.replace('_', ' ')} (batch {results['train_batch']}) | {value:.3g} | img/s |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
