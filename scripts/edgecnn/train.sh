#!/usr/bin/env bash
# EdgeCNN on a facial expression dataset (fer2013 or rafdb): train, then ten-crop test.
# usage: DATA=/path/to/datasets bash scripts/edgecnn/train.sh DATASET SEED [CONFIG OPTIONS...]
set -euo pipefail
source "$(dirname "$0")/../common.sh" 2 "DATASET SEED" "$@"
DATASET=$1 SEED=$2
shift 2
TRAINER=EdgeCNN
CFG=${CFG:-$DATASET}  # configs/trainers/EdgeCNN/<dataset>.yaml holds each dataset's recipe
launch "${OUTPUT}/${DATASET}/${TRAINER}/${CFG}/seed${SEED}" train "$DATASET" "$SEED" \
    "$REPO/configs/trainers/${TRAINER}/${CFG}.yaml" "$@"
