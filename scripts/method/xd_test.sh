#!/usr/bin/env bash
# Cross-dataset / domain generalisation, step 2: evaluate the last-epoch model trained on SOURCE (default imagenet) on a target dataset.
# usage: DATA=/path/to/datasets bash scripts/<method>/xd_test.sh DATASET SEED [CONFIG OPTIONS...]
# scripts/<method>/ links to this folder: the method is the folder name the script was called by.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run xd_test --scripts-folder "$(basename "$(dirname "$0")")" "$@"
