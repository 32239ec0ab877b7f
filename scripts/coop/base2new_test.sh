#!/usr/bin/env bash
# CoOp. Base-to-new, step 2: evaluate the base-trained model on the new half of the classes.
# usage: DATA=/path/to/datasets bash scripts/coop/base2new_test.sh DATASET SEED [CONFIG OPTIONS...]
# (scripts/coop/ is a folder, not a link to scripts/method/, for the release's main.sh and eval.sh.)
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run base2new_test --scripts-folder coop "$@"
