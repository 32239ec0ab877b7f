#!/usr/bin/env bash
# Cross-dataset / domain generalisation, step 2: evaluate the last-epoch DCP model trained on
# SOURCE (default imagenet) on a target dataset (another of the 11, or imagenetv2, imagenet_sketch,
# imagenet_a, imagenet_r).
# usage: DATA=/path/to/datasets bash scripts/dcp/xd_test.sh DATASET SEED [CONFIG OPTIONS...]
export TRAINER=DCP CFG=${CFG:-vit_b16_c2_ep20_batch4_16ctx} METHOD_DIR=scripts/dcp USAGE_NAME=$0
exec bash "$(dirname "$0")/../tasks/xd_test.sh" "$@"
