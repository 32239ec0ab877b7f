#!/usr/bin/env bash
# Few-shot classification: train and test on all classes with SHOTS images per class.
# usage: DATA=/path/to/datasets bash scripts/hicropl/few_shot.sh DATASET SHOTS SEED [CONFIG OPTIONS...]
set -euo pipefail
source "$(dirname "$0")/../common.sh" 3 "DATASET SHOTS SEED" "$@"
DATASET=$1 SHOTS=$2 SEED=$3
shift 3
TRAINER=HiCroPL
CFG=${CFG:-vit_b16_c2_ep50_batch32_16ctx_few_shot}
DIR=${OUTPUT}/${DATASET}/${TRAINER}/${CFG}_${SHOTS}shots/seed${SEED}
launch "$DIR" train "$DATASET" "$SEED" "$REPO/configs/trainers/${TRAINER}/${CFG}.yaml" \
    DATASET.NUM_SHOTS "$SHOTS" "$@"
