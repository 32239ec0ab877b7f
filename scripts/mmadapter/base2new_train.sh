#!/usr/bin/env bash
# MMA under the release's script name. Base-to-new, step 1: train on the base half (16 shots).
# usage: DATA=/path/to/datasets bash scripts/mmadapter/base2new_train.sh DATASET SEED [CFG] [CONFIG OPTIONS...]
#        (the release's form: DATASET SEED CFG, e.g. caltech101 1 vit_b16_ep5)
source "$(dirname "$0")/release_args.sh"
if release_cfg 3 "$@"; then set -- "${@:1:2}" "${@:4}"; fi
run_mma base2new_train "$@"
