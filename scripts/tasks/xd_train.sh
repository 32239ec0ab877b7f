#!/usr/bin/env bash
# Cross-dataset / domain generalisation, step 1: train on the source dataset (normally
# imagenet), all classes, 16 shots.
# usage (through a method's wrapper, which sets TRAINER and CFG): DATA=/path/to/datasets bash scripts/<method>/xd_train.sh imagenet SEED [CONFIG OPTIONS...]
set -euo pipefail
source "$(dirname "$0")/../common.sh" 2 "DATASET SEED" "$@"
DATASET=$1 SEED=$2
shift 2
TRAINER=${TRAINER:?set by scripts/<method>/*.sh} CFG=${CFG:?set by scripts/<method>/*.sh} METHOD_DIR=${METHOD_DIR:-scripts/<method>}
SHOTS=16
DIR=${OUTPUT}/${DATASET}/${TRAINER}/${CFG}_${SHOTS}shots/seed${SEED}
launch "$DIR" train "$DATASET" "$SEED" "$REPO/configs/trainers/${TRAINER}/${CFG}.yaml" \
    DATASET.NUM_SHOTS "$SHOTS" "$@"
