#!/usr/bin/env bash
# The release's name of xd_train.sh: train on the source dataset (imagenet), all classes, 16 shots.
# usage: DATA=/path/to/datasets bash scripts/maple/xd_train_maple.sh DATASET SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run xd_train --scripts-folder maple "$@"
