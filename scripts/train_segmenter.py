r"""Train the skin-dualnet lesion segmenter (Deep-UNet) with Accelerate.

    accelerate launch scripts/train_segmenter.py \
        --config configuration/segmenter.json \
        --dataset ham10000 --data-root ../shared/data/ham10000 \
        --dataset isic2017 --data-root ../shared/data/isic2017 \
        --output-dir runs/segmenter --epochs 30 --batch-size 16 --mixed-precision bf16

Plain `python scripts/train_segmenter.py ...` runs on one device. Several processes (data parallel; --batch-size
is per process):

    accelerate launch --multi_gpu --num_processes 4 scripts/train_segmenter.py ...        # 4 GPUs
    accelerate launch --multi_gpu --num_machines 2 --machine_rank 0 --num_processes 16 \
        --main_process_ip HOST0 --main_process_port 29500 scripts/train_segmenter.py ...  # 2 nodes x 8 GPUs
    torchrun --nproc_per_node 2 scripts/train_segmenter.py ...                            # 2 CPU processes (gloo)

Each epoch ends with a validation pass scored by the shipped `lesion_segmentation` metric (Dice, Jaccard, ...); the
epoch with the best Dice is kept and saved with its image processor in --output-dir, next to metrics.json,
splits.json and a model card. `--resume latest` continues an interrupted run from its newest checkpoint.
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from modeling_skinlesion.training.arguments import (  # noqa: E402
    DataArguments,
    ModelArguments,
    SplitArguments,
    TrainingArguments,
    parse_arguments,
)

logger = logging.getLogger("train_segmenter")  # INFO on the main process, errors elsewhere (`_training.setup_logging`)


@dataclass(kw_only=True)
class SegmenterArguments(ModelArguments, DataArguments, SplitArguments, TrainingArguments):
    _argument_group_name = "model"

    config: str = field(
        metadata={
            "help": "Segmenter preset JSON (e.g. configuration/segmenter.json) or a saved segmenter folder to start "
            "from."
        }
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(SegmenterArguments, argv, description=__doc__)

    # The heavy imports come after parsing, so that --help and usage errors answer at once.
    from transformers import AutoConfig

    from modeling_skinlesion import SkinLesionImageProcessor, SkinLesionSegmenter, SkinLesionSegmenterConfig
    from modeling_skinlesion.data import SkinLesionTransform
    from modeling_skinlesion.training import evaluation as E
    from modeling_skinlesion.training import loop as T

    output_dir = Path(args.output_dir)
    timer = T.Timer()

    # Accelerator, logging (INFO on the main process only), seed ------------------------------------------------------
    accelerator = T.start_accelerator(args, output_dir)

    # Data: every source with masks, grouped split stratified by source, file check ---------------------------------
    with accelerator.main_process_first():
        dataset = T.load_sources(args, "segmentation")
        splits, bad_files = T.prepare_splits(args, dataset, stratify_column="source", require_masks=True)
    split_summary = T.describe_split(splits)
    logger.info(f"Split: {split_summary}")
    if accelerator.is_main_process:
        T.write_split_ids(output_dir / "splits.json", splits, args, args.dataset, args.data_root)

    # Model ----------------------------------------------------------------------------------------------------------
    if T.is_model_folder(args.config):
        model = SkinLesionSegmenter.from_pretrained(args.config)
    else:
        config = AutoConfig.from_pretrained(args.config)
        if not isinstance(config, SkinLesionSegmenterConfig):
            raise ValueError(f"--config {args.config} is a {type(config).__name__}, not a segmenter configuration.")
        model = SkinLesionSegmenter(config)
    if args.backbone_pretrained:
        T.load_backbones(model)
    processor = SkinLesionImageProcessor.from_model_config(model.config)
    size = processor.size["height"], processor.size["width"]

    # Loaders, optimizer, schedule, prepare, resume ------------------------------------------------------------------
    train_transform = SkinLesionTransform(processor, train=True, seed=args.seed)
    eval_transform = SkinLesionTransform(processor, train=False)
    run = T.prepare_run(
        accelerator, args, model, splits, train_transform, eval_transform, tracker="skin-dualnet-segmenter"
    )
    model, state = run.model, run.state

    # Train, validate every epoch, keep the best ----------------------------------------------------------------------
    T.train_loop(
        accelerator,
        args,
        run,
        timer,
        compute_loss=lambda model, batch: model(pixel_values=batch["pixel_values"], labels=batch["lesion_mask"]).loss,
        evaluate=lambda model: E.validate_segmenter(model, run.eval_dataloader, accelerator),
        blank_batch=lambda: E.blank_image_batch(size, accelerator.device, classifier=False),
        best_key="dice",
        scores=E.SEGMENTATION_SCORES,
    )

    # Save the best model, its processor, metrics and a model card ---------------------------------------------------
    metrics = T.run_record(
        accelerator, args, state, timer, task="segmentation", split=split_summary, bad_files=bad_files
    )
    T.save_run(
        accelerator,
        output_dir,
        accelerator.unwrap_model(model),
        processor,
        metrics,
        repo_id=f"org/{output_dir.name}",
        training={"preset": args.config, **T.training_facts(args, metrics)},
    )
    logger.info(f"Saved the best model (epoch {state.best_epoch + 1}, dice {state.best_metric:.4f}) to {output_dir}")
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
