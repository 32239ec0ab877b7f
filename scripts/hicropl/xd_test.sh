#!/usr/bin/env bash
# Cross-dataset / domain generalisation, step 2: evaluate the last-epoch HiCroPL model trained on
# SOURCE (default imagenet) on a target dataset (another of the 11, or imagenetv2, imagenet_sketch,
# imagenet_a, imagenet_r).
# usage: DATA=/path/to/datasets bash scripts/hicropl/xd_test.sh DATASET SEED [CONFIG OPTIONS...]
export TRAINER=HiCroPL CFG=${CFG:-vit_b16_c2_ep5_batch32_2ctx_cross_datasets} METHOD_DIR=scripts/hicropl USAGE_NAME=$0
exec bash "$(dirname "$0")/../tasks/xd_test.sh" "$@"
