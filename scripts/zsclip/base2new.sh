#!/usr/bin/env bash
# Zero-shot CLIP on the base and the new half of the classes, in the base-to-new output layout
# (test_base/ and test_new/, seed1), so parse_test_res.py --base2new puts it beside trained methods.
# usage: DATA=/path/to/datasets bash scripts/zsclip/base2new.sh DATASET [CONFIG OPTIONS...]
set -euo pipefail
source "$(dirname "$0")/../common.sh" 1 "DATASET" "$@"
DATASET=$1
shift 1
TRAINER=ZeroshotCLIP
CFG=${CFG:-vit_b16}
for SUB in base new; do
    launch "${OUTPUT}/base2new/test_${SUB}/${DATASET}/shots_16/${TRAINER}/${CFG}/seed1" test \
        "$DATASET" 1 "$REPO/configs/trainers/${TRAINER}/${CFG}.yaml" --eval-only \
        DATASET.SUBSAMPLE_CLASSES "$SUB" "$@"
done
