#!/usr/bin/env bash
# The release's name of base2new_train.sh: train MaPLe on the base half of the classes (16 shots).
# usage: DATA=/path/to/datasets bash scripts/maple/base2new_train_maple.sh DATASET SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run base2new_train --scripts-folder maple "$@"
