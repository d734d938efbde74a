#!/usr/bin/env python
r"""Compare out-of-distribution scores of a classifier checkpoint, to choose the gate's method by measurement.

    python scripts/compare_ood_methods.py --model checkpoints/skin-dualnet-small --data-root ../shared/data \
        --splits-file runs/release/classifier-splits.json --ood-set runs/ood-set --output runs/ood-methods

Runs every image of the classifier's train / validation / test split (HAM10000), the ISIC 2017 images and the OOD set
(`scripts/make_ood_set.py`) through the model's ordinary forward (its own masks, as the pipeline does) and keeps, per
image: the logits, the fused embeddings of the image and lesion branches, the tokens before fusion (mean-pooled) and
the trunks' last feature maps (mean-pooled, read by a hook). The features are cached in `OUTPUT/features-*.npz`
(a rerun reuses them). Then each candidate score (maximum softmax probability, energy, feature norm, k-NN distance,
class-conditional Mahalanobis with a tied covariance, on each feature) is fitted on the **train** split only, its
threshold set on the validation split to accept `--accept-rate` of it, and measured as AUROC / FPR at 95 % TPR against
the OOD set's `dev` part (the method is chosen there), its `report` part, and the acceptance rates of the test split
and ISIC 2017. Writes `OUTPUT/comparison.json` and prints a table.
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modeling_skinlesion.cli import HelpFormatter  # noqa: E402

FEATURES = ("fused", "tokens", "trunk_image", "trunk_both")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="Classifier folder.")
    parser.add_argument("--data-root", required=True, type=Path, help="Folder holding ham10000/ and isic2017/.")
    parser.add_argument("--splits-file", required=True, type=Path, help="The classifier's splits.json.")
    parser.add_argument("--ood-set", required=True, type=Path, help="Folder written by scripts/make_ood_set.py.")
    parser.add_argument("--output", required=True, type=Path, help="Folder for the feature cache and the results.")
    parser.add_argument("--accept-rate", type=float, default=0.95, help="Share of validation images accepted.")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per forward pass.")
    return parser.parse_args(argv)


def extract(model, processor, metadata_processor, items, batch_size: int) -> dict:
    """Per image: logits, fused embeddings, pre-fusion token means and trunk feature means. `items` yields
    `(PIL image, metadata record)`."""
    import numpy as np
    import torch

    captured = {}

    def hook(name):
        def keep(module, inputs):
            captured[name] = inputs[0].mean((2, 3))
            captured[name + "_tokens"] = module._conv_forward(inputs[0], module.weight, module.bias).mean((2, 3))

        return keep

    handles = [
        model.image_encoder.projection.register_forward_pre_hook(hook("image")),
        model.lesion_branch.projection.register_forward_pre_hook(hook("lesion")),
    ]
    out = {key: [] for key in ("logits", "fused", "tokens", "trunk_image", "trunk_lesion", "mask_empty")}
    batch = []

    def flush():
        images = [image for image, _ in batch]
        records = [metadata_processor.normalize_record(record) for _, record in batch]
        pixel_values = processor(images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            output = model(pixel_values=pixel_values, **metadata_processor.encode(records))
        out["logits"].append(output.logits.numpy())
        out["fused"].append(torch.cat([output.image_embeds, output.lesion_embeds], 1).numpy())
        out["tokens"].append(torch.cat([captured["image_tokens"], captured["lesion_tokens"]], 1).numpy())
        out["trunk_image"].append(captured["image"].numpy())
        out["trunk_lesion"].append(captured["lesion"].numpy())
        out["mask_empty"].append(output.mask_empty.numpy())
        batch.clear()

    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    for handle in handles:
        handle.remove()
    return {key: np.concatenate(value) for key, value in out.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from modeling_skinlesion import SkinDualNet, SkinLesionImageProcessor, SkinLesionMetadataProcessor, load_image
    from modeling_skinlesion.data import column_values, load_ham10000, load_isic2017
    from modeling_skinlesion.trust import ood_metrics

    torch.set_num_threads(2)
    model = SkinDualNet.from_pretrained(args.model).eval()
    processor = SkinLesionImageProcessor.from_pretrained(args.model)
    metadata_processor = SkinLesionMetadataProcessor.from_config(model.config)
    args.output.mkdir(parents=True, exist_ok=True)
    splits = json.loads(args.splits_file.read_text())
    ham = load_ham10000(args.data_root / "ham10000", masks=False)
    ids = column_values(ham, "image_id")
    names = ham.features["label"].names
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    remap = np.array([labels.index(name) for name in names])

    def dataset_items(dataset):
        for row in dataset:
            yield row["image"].convert("RGB"), {"age": row["age"], "sex": row["sex"], "site": row["site"]}

    sets = {}
    for name in ("validation", "test", "isic2017", "ood", "train"):
        path = args.output / f"features-{name}.npz"
        if path.is_file():
            sets[name] = dict(np.load(path, allow_pickle=True))
            continue
        start = time.time()
        extra = {}
        if name in ("train", "validation", "test"):
            wanted = set(splits[name])
            subset = ham.select([i for i, x in enumerate(ids) if x in wanted])
            items = dataset_items(subset)
            extra["labels"] = remap[np.asarray(subset["label"])]
        elif name == "isic2017":
            subset = load_isic2017(args.data_root / "isic2017", masks=False)
            items = dataset_items(subset)
        else:
            with (args.ood_set / "manifest.csv").open() as handle:
                rows = list(csv.DictReader(handle))
            items = ((load_image(args.ood_set / row["file"]), None) for row in rows)
            extra["category"] = np.array([row["category"] for row in rows])
            extra["part"] = np.array([row["part"] for row in rows])
        features = extract(model, processor, metadata_processor, items, args.batch_size)
        features.update(extra)
        features["seconds"] = np.array(time.time() - start)
        np.savez(path, **features)
        sets[name] = features
        print(f"{name}: {len(features['logits'])} images in {time.time() - start:.0f} s", flush=True)
    for data in sets.values():
        data["trunk_both"] = np.concatenate([data["trunk_image"], data["trunk_lesion"]], 1)

    from modeling_skinlesion.trust import energy_score, fit_mahalanobis, mahalanobis_score

    def knn_scores(train, queries, k=10):
        bank = torch.nn.functional.normalize(torch.from_numpy(train).float(), dim=1)
        out = []
        for chunk in np.array_split(queries, max(1, len(queries) // 512)):
            q = torch.nn.functional.normalize(torch.from_numpy(chunk).float(), dim=1)
            out.append((1 - (q @ bank.T).topk(k, dim=1).values[:, -1]).numpy())
        return np.concatenate(out)

    train_labels = sets["train"]["labels"]
    candidates = {}
    for data in sets.values():
        data["msp"] = -torch.from_numpy(data["logits"]).softmax(-1).max(-1).values.numpy()
        data["energy"] = energy_score(torch.from_numpy(data["logits"])).numpy()
    candidates["max_softmax"] = {name: data["msp"] for name, data in sets.items()}
    candidates["energy"] = {name: data["energy"] for name, data in sets.items()}
    for feature in FEATURES:
        candidates[f"feature_norm:{feature}"] = {
            name: -np.linalg.norm(data[feature], axis=1) for name, data in sets.items()
        }
        candidates[f"knn10:{feature}"] = {
            name: knn_scores(sets["train"][feature], data[feature]) for name, data in sets.items()
        }
        means, whitening = fit_mahalanobis(torch.from_numpy(sets["train"][feature]), torch.from_numpy(train_labels))
        candidates[f"mahalanobis:{feature}"] = {
            name: mahalanobis_score(torch.from_numpy(data[feature]), means, whitening).numpy()
            for name, data in sets.items()
        }

    ood_part = sets["ood"]["part"]
    results = {}
    for method, scores in candidates.items():
        threshold = float(np.quantile(scores["validation"], args.accept_rate))
        entry = {"threshold": threshold}
        for part in ("dev", "report"):
            entry[part] = ood_metrics(
                scores["validation" if part == "dev" else "test"], scores["ood"][ood_part == part]
            )
        entry["all_ood_vs_test"] = ood_metrics(scores["test"], scores["ood"])
        entry["accepted_test"] = float((scores["test"] <= threshold).mean())
        entry["accepted_isic2017"] = float((scores["isic2017"] <= threshold).mean())
        entry["refused_ood"] = float((scores["ood"] > threshold).mean())
        entry["refused_ood_by_category"] = {
            category: float((scores["ood"][sets["ood"]["category"] == category] > threshold).mean())
            for category in sorted(set(sets["ood"]["category"].tolist()))
        }
        results[method] = entry
    (args.output / "comparison.json").write_text(json.dumps(results, indent=1))
    print(
        f"{'method':28s} {'dev AUROC':>9s} {'dev FPR95':>9s} {'rep AUROC':>9s} {'test ok':>7s} {'2017 ok':>7s} "
        f"{'OOD refused':>11s}"
    )
    for method, entry in sorted(results.items(), key=lambda item: -item[1]["dev"]["auroc"]):
        print(
            f"{method:28s} {entry['dev']['auroc']:9.4f} {entry['dev']['fpr_at_95_tpr']:9.4f} "
            f"{entry['report']['auroc']:9.4f} {entry['accepted_test']:7.3f} {entry['accepted_isic2017']:7.3f} "
            f"{entry['refused_ood']:11.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
