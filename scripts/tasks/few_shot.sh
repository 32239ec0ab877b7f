#!/usr/bin/env bash
# Few-shot classification: train and test on all classes with SHOTS images per class.
# usage (through a method's wrapper, which sets TRAINER and CFG): DATA=/path/to/datasets bash scripts/<method>/few_shot.sh DATASET SHOTS SEED [CONFIG OPTIONS...]
set -euo pipefail
source "$(dirname "$0")/../common.sh" 3 "DATASET SHOTS SEED" "$@"
DATASET=$1 SHOTS=$2 SEED=$3
shift 3
TRAINER=${TRAINER:?set by scripts/<method>/*.sh} CFG=${CFG:?set by scripts/<method>/*.sh} METHOD_DIR=${METHOD_DIR:-scripts/<method>}
DIR=${OUTPUT}/${DATASET}/${TRAINER}/${CFG}_${SHOTS}shots/seed${SEED}
launch "$DIR" train "$DATASET" "$SEED" "$REPO/configs/trainers/${TRAINER}/${CFG}.yaml" \
    DATASET.NUM_SHOTS "$SHOTS" "$@"
