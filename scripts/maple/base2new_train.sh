#!/usr/bin/env bash
# Base-to-new, step 1: train on the base half of the classes (16 shots).
# usage: DATA=/path/to/datasets bash scripts/maple/base2new_train.sh DATASET SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run base2new_train --scripts-folder maple "$@"
