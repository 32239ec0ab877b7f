#!/usr/bin/env bash
# Cross-dataset / domain generalisation, step 2: evaluate the last-epoch model trained on
# SOURCE (default imagenet) on a target dataset (the 10 others, or imagenetv2,
# imagenet_sketch, imagenet_a, imagenet_r).
# usage (through a method's wrapper, which sets TRAINER and CFG): DATA=/path/to/datasets bash scripts/<method>/xd_test.sh DATASET SEED [CONFIG OPTIONS...]
set -euo pipefail
source "$(dirname "$0")/../common.sh" 2 "DATASET SEED" "$@"
DATASET=$1 SEED=$2
shift 2
TRAINER=${TRAINER:?set by scripts/<method>/*.sh} CFG=${CFG:?set by scripts/<method>/*.sh} METHOD_DIR=${METHOD_DIR:-scripts/<method>}
SOURCE=${SOURCE:-imagenet}
SHOTS=16
CONFIG=$REPO/configs/trainers/${TRAINER}/${CFG}.yaml
LOADEP=${LOADEP:-$(config_value "$CONFIG" MAX_EPOCH)}  # the epochs xd_train.sh trained
MODEL_DIR=${OUTPUT}/${SOURCE}/${TRAINER}/${CFG}_${SHOTS}shots/seed${SEED}
if ! finished "$MODEL_DIR" train; then
    echo "No finished training in $MODEL_DIR: run ${METHOD_DIR}/xd_train.sh $SOURCE $SEED first" >&2
    exit 1
fi
launch "${OUTPUT}/evaluation/${TRAINER}/${CFG}_${SHOTS}shots/${DATASET}/seed${SEED}" test \
    "$DATASET" "$SEED" "$CONFIG" --model-dir "$MODEL_DIR" --load-epoch "$LOADEP" --eval-only "$@"
