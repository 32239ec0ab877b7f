#!/usr/bin/env bash
# MMA under the release's script name. Cross-dataset, step 2: evaluate the model trained on SOURCE
# (default imagenet) on DATASET.
# usage: DATA=/path/to/datasets bash scripts/mmadapter/xd_test.sh DATASET SEED [CFG [LOADEP]] [CONFIG OPTIONS...]
#        (the release's form: DATASET SEED CFG LOADEP, e.g. dtd 1 vit_b16_ep5_imnet 5)
source "$(dirname "$0")/release_args.sh"
if release_cfg 3 "$@"; then
    if [ $# -ge 4 ] && ! is_option_key "$4"; then export LOADEP="$4"; set -- "${@:1:2}" "${@:5}"
    else set -- "${@:1:2}" "${@:4}"; fi
fi
run_mma xd_test "$@"
