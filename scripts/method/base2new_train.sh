#!/usr/bin/env bash
# Base-to-new, step 1: train on the base half of the classes (16 shots).
# usage: DATA=/path/to/datasets bash scripts/<method>/base2new_train.sh DATASET SEED [CONFIG OPTIONS...]
# scripts/<method>/ links to this folder: the method is the folder name the script was called by.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run base2new_train --scripts-folder "$(basename "$(dirname "$0")")" "$@"
