#!/usr/bin/env bash
# Base-to-new, step 2: evaluate the base-trained model (its model-best, as selected during
# training) on the new half of the classes.
# usage (through a method's wrapper, which sets TRAINER and CFG): DATA=/path/to/datasets bash scripts/<method>/base2new_test.sh DATASET SEED [CONFIG OPTIONS...]
set -euo pipefail
source "$(dirname "$0")/../common.sh" 2 "DATASET SEED" "$@"
DATASET=$1 SEED=$2
shift 2
TRAINER=${TRAINER:?set by scripts/<method>/*.sh} CFG=${CFG:?set by scripts/<method>/*.sh} METHOD_DIR=${METHOD_DIR:-scripts/<method>}
SHOTS=16
COMMON=${DATASET}/shots_${SHOTS}/${TRAINER}/${CFG}/seed${SEED}
MODEL_DIR=${OUTPUT}/base2new/train_base/${COMMON}
if ! finished "$MODEL_DIR" train; then
    echo "No finished training in $MODEL_DIR: run ${METHOD_DIR}/base2new_train.sh $DATASET $SEED first" >&2
    exit 1
fi
launch "${OUTPUT}/base2new/test_new/${COMMON}" test "$DATASET" "$SEED" \
    "$REPO/configs/trainers/${TRAINER}/${CFG}.yaml" --model-dir "$MODEL_DIR" --eval-only \
    DATASET.NUM_SHOTS "$SHOTS" DATASET.SUBSAMPLE_CLASSES new "$@"
