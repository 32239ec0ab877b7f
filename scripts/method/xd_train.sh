#!/usr/bin/env bash
# Cross-dataset / domain generalisation, step 1: train on the source dataset (normally imagenet), all classes, 16 shots.
# usage: DATA=/path/to/datasets bash scripts/<method>/xd_train.sh DATASET SEED [CONFIG OPTIONS...]
# scripts/<method>/ links to this folder: the method is the folder name the script was called by.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run xd_train --scripts-folder "$(basename "$(dirname "$0")")" "$@"
