#!/usr/bin/env bash
# Base-to-new, step 2: evaluate the base-trained model on the new half of the classes.
# usage: DATA=/path/to/datasets bash scripts/maple/base2new_test.sh DATASET SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run base2new_test --scripts-folder maple "$@"
