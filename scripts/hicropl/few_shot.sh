#!/usr/bin/env bash
# Few-shot classification: train and test HiCroPL on all classes with SHOTS images per class.
# usage: DATA=/path/to/datasets bash scripts/hicropl/few_shot.sh DATASET SHOTS SEED [CONFIG OPTIONS...]
export TRAINER=HiCroPL CFG=${CFG:-vit_b16_c2_ep50_batch32_16ctx_few_shot} METHOD_DIR=scripts/hicropl USAGE_NAME=$0
exec bash "$(dirname "$0")/../tasks/few_shot.sh" "$@"
