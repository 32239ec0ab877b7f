#!/usr/bin/env bash
# Cross-dataset / domain generalisation, step 1: train DCP on the source dataset (normally
# imagenet), all classes, 16 shots.
# usage: DATA=/path/to/datasets bash scripts/dcp/xd_train.sh imagenet SEED [CONFIG OPTIONS...]
export TRAINER=DCP CFG=${CFG:-vit_b16_c2_ep20_batch4_16ctx} METHOD_DIR=scripts/dcp USAGE_NAME=$0
exec bash "$(dirname "$0")/../tasks/xd_train.sh" "$@"
