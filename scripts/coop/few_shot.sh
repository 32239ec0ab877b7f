#!/usr/bin/env bash
# CoOp. Few-shot classification: train and test on all classes with SHOTS images per class.
# usage: DATA=/path/to/datasets bash scripts/coop/few_shot.sh DATASET SHOTS SEED [CONFIG OPTIONS...]
# (scripts/coop/ is a folder, not a link to scripts/method/, for the release's main.sh and eval.sh.)
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run few_shot --scripts-folder coop "$@"
