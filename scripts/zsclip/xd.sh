#!/usr/bin/env bash
# Zero-shot CLIP on all classes of DATASET (cross-dataset / domain generalisation rows), in the
# layout of xd_test.sh: output/evaluation/ZeroshotCLIP/<cfg>/<dataset>/seed1.
# usage: DATA=/path/to/datasets bash scripts/zsclip/xd.sh DATASET [CONFIG OPTIONS...]
set -euo pipefail
source "$(dirname "$0")/../common.sh" 1 "DATASET" "$@"
DATASET=$1
shift 1
TRAINER=ZeroshotCLIP
CFG=${CFG:-vit_b16}
launch "${OUTPUT}/evaluation/${TRAINER}/${CFG}/${DATASET}/seed1" test \
    "$DATASET" 1 "$REPO/configs/trainers/${TRAINER}/${CFG}.yaml" --eval-only "$@"
