#!/usr/bin/env bash
# Base-to-new, step 2: evaluate the base-trained DCP model on the new half of the classes.
# usage: DATA=/path/to/datasets bash scripts/dcp/base2new_test.sh DATASET SEED [CONFIG OPTIONS...]
export TRAINER=DCP CFG=${CFG:-vit_b16_c2_ep20_batch4_16ctx} METHOD_DIR=scripts/dcp USAGE_NAME=$0
exec bash "$(dirname "$0")/../tasks/base2new_test.sh" "$@"
