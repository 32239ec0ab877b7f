#!/usr/bin/env bash
# Cross-dataset / domain generalisation, step 2: evaluate the last-epoch model trained on SOURCE (default imagenet) on a target dataset.
# usage: DATA=/path/to/datasets bash scripts/maple/xd_test.sh DATASET SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run xd_test --scripts-folder maple "$@"
