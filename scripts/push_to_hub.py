#!/usr/bin/env python
r"""Export a trained skin-dualnet checkpoint as a Hub-ready folder and, optionally, upload it.

The folder holds everything a user needs with `transformers` alone:
`config.json` (with `auto_map`), `model.safetensors`, the remote-code files (`configuration_skinlesion.py`,
`modeling_skinlesion.py`, `image_processing_skinlesion.py`; for a classifier also the "skin-lesion-analysis" pipeline,
`custom_pipelines` in config.json, and its code files), `preprocessor_config.json` and a `README.md` model card
(licence, training data, metrics, intended use, limitations, citation).

    python scripts/push_to_hub.py --model-path runs/classifier --output-dir hub/skin-dualnet \
        --metrics-file runs/classifier/eval/metrics.json

    # then, online, with a token (--token, $HF_TOKEN or `hf auth login`):
    python scripts/push_to_hub.py ... --push --repo-id org/skin-dualnet

    # the shipped release checkpoint, uploaded exactly as it is in the repository:
    python scripts/push_to_hub.py --model-path checkpoints/skin-dualnet-small \
        --output-dir checkpoints/skin-dualnet-small --push --repo-id org/skin-dualnet

The training sets (which decide the card's licence) and the scores come from the metrics.json a training or
fine-tuning run saved next to its model, unless `--datasets` / `--metrics-file` name them. Options take dashes or
underscores (`--model-path` = `--model_path`).

Exit status: 0 on success; 1 for bad input or a refused upload (token, permissions); 2 when the Hub cannot be
reached (offline mode or no network). The exported folder is left intact in every case, ready for a later upload.
"""

import argparse
import dataclasses
import importlib
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from transformers import HfArgumentParser  # transformers' top level is lazy: no torch until a model class is used

if TYPE_CHECKING:
    from modeling_skinlesion import SkinLesionImageProcessor

# torch, huggingface_hub's client and the package are imported after parsing, so `--help` answers at once.

logger = logging.getLogger("push_to_hub")

EXIT_BAD_INPUT = 1
EXIT_NO_NETWORK = 2
# Files this script writes; removed first when re-exporting into the same folder, so no stale file survives.
EXPORT_PATTERNS = ("config.json", "preprocessor_config.json", "README.md", "metrics.json", "*.safetensors")
EXPORT_PATTERNS += ("*.safetensors.index.json", "risk_coverage.png")


@dataclass
class ExportArguments:
    model_path: str = field(metadata={"help": "Trained model folder (save_pretrained output) or Hub id."})
    output_dir: str = field(metadata={"help": "Folder to write the Hub-ready repository into."})
    datasets: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Training sets of the weights (ham10000, isic2017, isic2018, isic2019, or your own names). They "
            "are described and cited in the card and decide its licence (CC BY-NC 4.0 for HAM10000/ISIC) (default: "
            "the sets recorded in the training run's metrics.json)."
        },
    )
    metrics_file: str | None = field(
        default=None,
        metadata={
            "help": "Metrics JSON to tabulate in the card (from scripts/evaluate_model.py or a training run; default: "
            "the metrics.json a training script saved next to the model)."
        },
    )
    repo_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub repository id to upload to and to name in the card's code examples (default: the "
            "placeholder org/skin-dualnet; set your own with --push)."
        },
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Checkpoint this one was fine-tuned from (default: `base_model` of the metrics JSON)."},
    )
    license: str | None = field(
        default=None, metadata={"help": "Licence id for the card (default: from the training data)."}
    )
    storage_dtype: Literal["float32", "float16"] = field(
        default="float32",
        metadata={
            "help": "Dtype of the floating-point tensors in model.safetensors. float16 halves the download; "
            "the config keeps dtype float32, so from_pretrained restores float32 weights (default: %(default)s)."
        },
    )
    push: bool = field(default=False, metadata={"help": "Upload the folder to `repo_id` after writing it."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: $HF_TOKEN or the cached login)."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    commit_message: str = field(
        default="Upload skin-dualnet checkpoint", metadata={"help": "Upload commit message (default: %(default)r)."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Write into a non-empty `output_dir` that is not a previous export."}
    )


class ExportArgumentParser(HfArgumentParser):
    """`HfArgumentParser` over `ExportArguments` that shows the docstring as written and each default once (in the
    help texts above), and makes a `bool` field that defaults to False a plain switch: HfArgumentParser itself writes
    `--push [PUSH]` (an optional true/false value) and appends every default a second time."""

    def __init__(self):
        super().__init__(ExportArguments, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        if field.type is bool and field.default is False:
            options = dict.fromkeys([f"--{field.name}", f"--{field.name.replace('_', '-')}"])
            parser.add_argument(*options, action="store_true", help=field.metadata.get("help"))
        else:
            HfArgumentParser._parse_dataclass_field(parser, field)


def find_training_record(model_path: str) -> Path | None:
    """The `metrics.json` a training script leaves next to the model it saved, if `model_path` is such a folder."""
    path = Path(model_path) / "metrics.json"
    return path if path.is_file() else None


def network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the Hub cannot be reached", for whichever HTTP client huggingface_hub uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"`output_dir` {output_dir} exists and is not a folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not (output_dir / "config.json").is_file() and not overwrite:
            raise ValueError(
                f"`output_dir` {output_dir} is not empty and holds no previous export; choose an empty folder or "
                "pass --overwrite."
            )
        for pattern in (*EXPORT_PATTERNS, "*.py"):
            for path in output_dir.glob(pattern):
                path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


def load_processor(model_path: str, config) -> "SkinLesionImageProcessor":
    """The processor saved with the model, or the one its config implies."""
    from modeling_skinlesion import SkinLesionImageProcessor

    try:
        return SkinLesionImageProcessor.from_pretrained(model_path)
    except OSError:
        logger.info("No preprocessor_config.json with the model; building the processor from its config.")
        return SkinLesionImageProcessor.from_model_config(config)


def release_training_facts(metrics: dict | None) -> dict[str, str] | None:
    """For a release report (`scripts/release_report.py`): which images the classifier saw, for the card's "Training
    data" section (and the Space's "what these weights were trained on")."""
    split = ((metrics or {}).get("training") or {}).get("split")
    if not split or "subgroups" not in metrics:
        return None
    facts = {
        "Classifier": f"the lesion-grouped HAM10000 training split, {split['train']['images']} images of "
        f"{split['train']['groups']} lesions; validation {split['validation']['images']} images (best epoch, logit "
        f"bias, temperature); test {split['test']['images']} images of {split['test']['groups']} lesions, never "
        "trained on",
        "Segmenter": "HAM10000 masks + ISIC 2017 pairs, with the classifier's validation and test lesions held out",
    }
    if metrics.get("recipe"):
        wall = sum(stage["wall_time_s"] for stage in metrics["recipe"])
        facts["Recipe"] = f"scripts/train_release.sh on a 2-core CPU, {wall / 60:.0f} minutes in all (stages below)"
    return facts


def store_half_precision(path: Path) -> None:
    """Rewrite a safetensors file with its float32 tensors as float16 (integers, e.g. BatchNorm counters, kept)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    half = {key: t.half() if t.dtype == torch.float32 else t for key, t in tensors.items()}
    save_file(half, str(path), metadata=metadata)


def check_export(output_dir: Path) -> list[str]:
    """Check the folder is loadable as remote code; returns its file names."""
    config = json.loads((output_dir / "config.json").read_text())
    auto_map = config.get("auto_map") or {}
    if not {"AutoConfig", "AutoModel"} <= set(auto_map):
        raise RuntimeError(f"config.json has no complete auto_map ({auto_map}); the model classes are not registered.")
    processor = json.loads((output_dir / "preprocessor_config.json").read_text())
    modules = {ref.split(".")[0] for ref in [*auto_map.values(), *(processor.get("auto_map") or {}).values()]}
    required = {"model.safetensors", "README.md", *(f"{module}.py" for module in modules)}
    if config.get("model_type") == "skin_dualnet":
        pipelines = config.get("custom_pipelines") or {}
        if "skin-lesion-analysis" not in pipelines:
            raise RuntimeError("config.json does not name the 'skin-lesion-analysis' pipeline (custom_pipelines).")
        required.add(pipelines["skin-lesion-analysis"]["impl"].split(".")[0] + ".py")
    missing = sorted(name for name in required if not (output_dir / name).is_file())
    if missing:
        raise RuntimeError(f"The export in {output_dir} lacks {missing}.")
    return sorted(path.name for path in output_dir.iterdir())


def upload(output_dir: Path, args: ExportArguments) -> int:
    import huggingface_hub
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder_note = f"The exported folder is intact at {output_dir}; upload it later with --push."
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        logger.error(
            "Cannot upload: offline mode is on (HF_HUB_OFFLINE=1). Unset it on a machine with network access. %s",
            folder_note,
        )
        return EXIT_NO_NETWORK
    token = args.token or huggingface_hub.get_token()
    if not token:
        logger.error("Cannot upload: no Hub token. Pass --token, set HF_TOKEN or run `hf auth login`. %s", folder_note)
        return EXIT_BAD_INPUT
    api = HfApi(token=token)
    try:
        url = api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        api.upload_folder(repo_id=args.repo_id, folder_path=output_dir, commit_message=args.commit_message)
    except HfHubHTTPError as error:
        logger.error("The Hub refused the upload to %s: %s. %s", args.repo_id, error, folder_note)
        return EXIT_BAD_INPUT
    except network_errors() as error:
        logger.error(
            "Cannot reach the Hugging Face Hub at %s (%s: %s); no network? %s",
            huggingface_hub.constants.ENDPOINT,
            type(error).__name__,
            error,
            folder_note,
        )
        return EXIT_NO_NETWORK
    logger.info("Uploaded %s to %s", output_dir, url)
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = ExportArgumentParser().parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from transformers import AutoModel

    from modeling_skinlesion import SkinDualNet, SkinLesionSegmenter, save_for_hub
    from modeling_skinlesion.model_card import DEFAULT_REPO_ID, load_metrics, training_datasets, write_model_card

    args.repo_id = args.repo_id or DEFAULT_REPO_ID
    output_dir = Path(args.output_dir)
    if output_dir.is_dir() and Path(args.model_path).resolve() == output_dir.resolve():
        # An existing export (e.g. the shipped checkpoints/skin-dualnet-small): check it and upload it unchanged.
        try:
            files = check_export(output_dir)
        except (RuntimeError, OSError, ValueError) as error:
            logger.error("%s is not a complete export: %s", output_dir, error)
            return EXIT_BAD_INPUT
        logger.info("%s is a complete export (%s); uploading it as it is", output_dir, ", ".join(files))
        return upload(output_dir, args) if args.push else 0
    try:
        record_file = find_training_record(args.model_path)
        record = load_metrics(record_file) if record_file else {}
        metrics_file = args.metrics_file or record_file
        metrics = load_metrics(metrics_file) if metrics_file else None
        datasets = args.datasets or training_datasets(metrics or {}) or training_datasets(record)
        if not datasets:
            raise ValueError(
                "Name the training sets with --datasets (e.g. `--datasets ham10000 isic2019`): the card states them "
                "and their licence decides the licence of the weights. (A training run's metrics.json next to the "
                "model records them; none was found.)"
            )
        logger.info("Training sets: %s%s", ", ".join(datasets), f"; metrics from {metrics_file}" if metrics else "")
        model = AutoModel.from_pretrained(args.model_path)
        if not isinstance(model, (SkinDualNet, SkinLesionSegmenter)):
            raise ValueError(
                f"{args.model_path} holds a {type(model).__name__}; expected a skin-dualnet SkinDualNet or "
                "SkinLesionSegmenter checkpoint."
            )
        processor = load_processor(args.model_path, model.config)
        prepare_output_dir(output_dir, args.overwrite)
    except (ValueError, OSError) as error:
        logger.error("%s", error)
        return EXIT_BAD_INPUT

    if isinstance(model, SkinDualNet):
        # Weights, processor and code, plus the "skin-lesion-analysis" pipeline (`custom_pipelines` and its code
        # files), so `pipeline("skin-lesion-analysis", model=repo, trust_remote_code=True)` works without our package.
        save_for_hub(model, output_dir, processor)
    else:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    if args.storage_dtype == "float16":
        store_half_precision(output_dir / "model.safetensors")
    if args.metrics_file:
        # The numbers of the card, machine-readable beside it (the tests compare the card with this file).
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        # Figures the report drew (the risk-coverage curve) sit beside it; the card links them by file name.
        figure = ((metrics or {}).get("selective_prediction") or {}).get("figure")
        if figure and (Path(args.metrics_file).parent / figure).is_file():
            shutil.copyfile(Path(args.metrics_file).parent / figure, output_dir / figure)
    write_model_card(
        output_dir,
        model.config,
        repo_id=args.repo_id,
        datasets=datasets,
        metrics=metrics,
        training=release_training_facts(metrics),
        base_model=args.base_model or (metrics or {}).get("base_model") or record.get("base_model"),
        license=args.license,
    )
    files = check_export(output_dir)
    logger.info("Wrote a Hub-ready %s to %s: %s", type(model).__name__, output_dir, ", ".join(files))
    if args.push:
        return upload(output_dir, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
