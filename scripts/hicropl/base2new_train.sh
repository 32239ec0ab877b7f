#!/usr/bin/env bash
# Base-to-new, step 1: train HiCroPL on the base half of the classes (16 shots).
# usage: DATA=/path/to/datasets bash scripts/hicropl/base2new_train.sh DATASET SEED [CONFIG OPTIONS...]
export TRAINER=HiCroPL CFG=${CFG:-vit_b16_c2_ep50_batch32_16ctx} METHOD_DIR=scripts/hicropl USAGE_NAME=$0
exec bash "$(dirname "$0")/../tasks/base2new_train.sh" "$@"
