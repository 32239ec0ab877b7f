#!/usr/bin/env bash
# CoOp. Cross-dataset / domain generalisation, step 1: train on the source dataset (normally
# imagenet), all classes, 16 shots.
# usage: DATA=/path/to/datasets bash scripts/coop/xd_train.sh DATASET SEED [CONFIG OPTIONS...]
# (scripts/coop/ is a folder, not a link to scripts/method/, for the release's main.sh and eval.sh.)
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run xd_train --scripts-folder coop "$@"
