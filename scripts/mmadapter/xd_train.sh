#!/usr/bin/env bash
# MMA under the release's script name. Cross-dataset, step 1: train on ImageNet (all classes, 16 shots).
# usage: DATA=/path/to/datasets bash scripts/mmadapter/xd_train.sh SEED [CFG] [CONFIG OPTIONS...]
#        (the release's form: SEED CFG; the dataset is imagenet, as in the release)
source "$(dirname "$0")/release_args.sh"
if release_cfg 2 "$@"; then set -- "$1" "${@:3}"; fi
run_mma xd_train "${SOURCE:-imagenet}" "$@"
