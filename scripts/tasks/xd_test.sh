#!/usr/bin/env bash
# Cross-dataset / domain generalisation, step 2: evaluate the last-epoch model trained on
# SOURCE (default imagenet) on a target dataset (the 10 others, or imagenetv2,
# imagenet_sketch, imagenet_a, imagenet_r).
# usage: DATA=/path/to/datasets bash scripts/hicropl/xd_test.sh DATASET SEED [CONFIG OPTIONS...]
set -euo pipefail
source "$(dirname "$0")/../common.sh" 2 "DATASET SEED" "$@"
DATASET=$1 SEED=$2
shift 2
TRAINER=HiCroPL
CFG=${CFG:-vit_b16_c2_ep5_batch32_2ctx_cross_datasets}
SOURCE=${SOURCE:-imagenet}
SHOTS=16
CONFIG=$REPO/configs/trainers/${TRAINER}/${CFG}.yaml
LOADEP=${LOADEP:-$(config_value "$CONFIG" MAX_EPOCH)}  # the epochs xd_train.sh trained
MODEL_DIR=${OUTPUT}/${SOURCE}/${TRAINER}/${CFG}_${SHOTS}shots/seed${SEED}
if ! finished "$MODEL_DIR" train; then
    echo "No finished training in $MODEL_DIR: run xd_train.sh $SOURCE $SEED first" >&2
    exit 1
fi
launch "${OUTPUT}/evaluation/${TRAINER}/${CFG}_${SHOTS}shots/${DATASET}/seed${SEED}" test \
    "$DATASET" "$SEED" "$CONFIG" --model-dir "$MODEL_DIR" --load-epoch "$LOADEP" --eval-only "$@"
