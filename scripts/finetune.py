#!/usr/bin/env python
r"""Fine-tune a pretrained skin-dualnet classifier on a new clinic's images, and report its scores before and after.

    python scripts/finetune.py --checkpoint checkpoints/skin-dualnet-small \
        --images clinic/photos --csv clinic/cases.csv \
        --column-map image=file label=diagnosis age=age sex=gender site=body_site group_id=patient \
        --label-map naevus=nv melanoma=mel other=akiec,bcc,bkl,df,vasc \
        --site-map "upper arm=upper extremity" "sole=palms/soles" --sex-map "unspecified=unknown" \
        --output-dir runs/clinic --epochs 5 --freeze-encoders

(`accelerate launch scripts/finetune.py ...` runs it on several GPUs.) A thin command line over
`modeling_skinlesion.training.finetune` (the same from Python: `load_clinic(...)`, then `finetune(checkpoint, data,
output_dir, ...)`). The clinic's data is a folder of images plus a CSV whose columns `--column-map` names (only
`image` and `label` are required). The command:

1. splits the clinic's images by `group_id` (patient or lesion), stratified by class (`--val-size`, `--split-seed`);
2. scores the checkpoint as it is on the validation images ("before"): each clinic class gets the probability of
   the checkpoint classes `--label-map` assigns to it (a clinic class named like a checkpoint class maps to it by
   default; unmapped checkpoint classes are dropped and the rest renormalised);
3. when the clinic's classes differ from the checkpoint's, gives the model a new head for them (loaded with the new
   `id2label` and `ignore_mismatched_sizes=True`); a clinic class mapped to exactly one checkpoint class starts from
   that class's row of the old head;
4. maps the clinic's metadata vocabulary onto the model's: `--site-map`/`--sex-map` add synonyms (saved in the new
   config, so the fine-tuned model keeps understanding them); values still unknown are treated as missing, and the
   report in metrics.json lists them;
5. with `--freeze-encoders`, caches the frozen part once (the segmenter's masks and both trunks' features, for
   `--cached-views` augmented views; `--no-cache-features` runs the images every step instead) and trains the fusion,
   metadata encoder and head on it; large images are decoded and shrunk once (`--working-size`);
6. fine-tunes with the training loop of train_classifier.py (same options, checkpoints and `--resume`), the
   segmenter frozen, and keeps the epoch with the best validation balanced accuracy ("after"), the starting model
   counting as epoch 0: if no epoch beats it, the starting model is saved and metrics.json says so
   (`kept_starting_model`);
7. refits for the clinic (`--recalibrate`, on by default) the temperature and logit bias, the referral threshold
   and the out-of-distribution gate on the clinic's split, and states in the model card what was refitted on how
   many images;
8. with `--test-size`, scores before and after on the clinic's test split, which chose neither the epoch nor the
   calibration (`before_test`, `after_test` in metrics.json), and saves the model, its processor, metrics.json,
   splits.json and a model card in `--output-dir`.

Fine-tuning starts from trained weights, so four defaults differ from train_classifier.py's: --epochs 5, --lr 1e-4,
--warmup-ratio 0.1 and --val-size 0.2 (see `FinetuneArguments`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from modeling_skinlesion.training.arguments import FinetuneArguments, parse_arguments  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(FinetuneArguments, argv, description=__doc__)
    # The heavy imports come after parsing, so that --help and usage errors answer at once.
    from modeling_skinlesion.training.finetuning import clinic_from_arguments, finetune

    _, report = finetune(args.checkpoint, clinic_from_arguments(args), args.output_dir, args=args)
    return report


if __name__ == "__main__":
    main()
