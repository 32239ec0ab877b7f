#!/usr/bin/env bash
# CoOp. Cross-dataset / domain generalisation, step 2: evaluate the last-epoch model trained on
# SOURCE (default imagenet) on a target dataset.
# usage: DATA=/path/to/datasets bash scripts/coop/xd_test.sh DATASET SEED [CONFIG OPTIONS...]
# (scripts/coop/ is a folder, not a link to scripts/method/, for the release's main.sh and eval.sh.)
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run xd_test --scripts-folder coop "$@"
