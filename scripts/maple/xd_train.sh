#!/usr/bin/env bash
# Cross-dataset / domain generalisation, step 1: train on the source dataset (normally imagenet), all classes, 16 shots.
# usage: DATA=/path/to/datasets bash scripts/maple/xd_train.sh DATASET SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run xd_train --scripts-folder maple "$@"
