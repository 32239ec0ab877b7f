#!/usr/bin/env bash
# Cross-dataset / domain generalisation, step 1: train HiCroPL on the source dataset (normally
# imagenet), all classes, 16 shots.
# usage: DATA=/path/to/datasets bash scripts/hicropl/xd_train.sh imagenet SEED [CONFIG OPTIONS...]
export TRAINER=HiCroPL CFG=${CFG:-vit_b16_c2_ep5_batch32_2ctx_cross_datasets} METHOD_DIR=scripts/hicropl USAGE_NAME=$0
exec bash "$(dirname "$0")/../tasks/xd_train.sh" "$@"
