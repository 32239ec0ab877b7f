#!/usr/bin/env bash
# Base-to-new, step 1: train on the base half of the classes (16 shots).
# usage (through a method's wrapper, which sets TRAINER and CFG): DATA=/path/to/datasets bash scripts/<method>/base2new_train.sh DATASET SEED [CONFIG OPTIONS...]
set -euo pipefail
source "$(dirname "$0")/../common.sh" 2 "DATASET SEED" "$@"
DATASET=$1 SEED=$2
shift 2
TRAINER=${TRAINER:?set by scripts/<method>/*.sh} CFG=${CFG:?set by scripts/<method>/*.sh} METHOD_DIR=${METHOD_DIR:-scripts/<method>}
SHOTS=16
DIR=${OUTPUT}/base2new/train_base/${DATASET}/shots_${SHOTS}/${TRAINER}/${CFG}/seed${SEED}
launch "$DIR" train "$DATASET" "$SEED" "$REPO/configs/trainers/${TRAINER}/${CFG}.yaml" \
    DATASET.NUM_SHOTS "$SHOTS" DATASET.SUBSAMPLE_CLASSES base "$@"
