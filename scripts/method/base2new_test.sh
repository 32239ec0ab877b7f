#!/usr/bin/env bash
# Base-to-new, step 2: evaluate the base-trained model (its model-best) on the new half of the classes.
# usage: DATA=/path/to/datasets bash scripts/<method>/base2new_test.sh DATASET SEED [CONFIG OPTIONS...]
# scripts/<method>/ links to this folder: the method is the folder name the script was called by.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run base2new_test --scripts-folder "$(basename "$(dirname "$0")")" "$@"
