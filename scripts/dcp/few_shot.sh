#!/usr/bin/env bash
# Few-shot classification: train and test DCP on all classes with SHOTS images per class.
# usage: DATA=/path/to/datasets bash scripts/dcp/few_shot.sh DATASET SHOTS SEED [CONFIG OPTIONS...]
export TRAINER=DCP CFG=${CFG:-vit_b16_c2_ep20_batch4_16ctx} METHOD_DIR=scripts/dcp USAGE_NAME=$0
exec bash "$(dirname "$0")/../tasks/few_shot.sh" "$@"
