#!/usr/bin/env bash
# Few-shot classification: train and test on all classes with SHOTS images per class.
# usage: DATA=/path/to/datasets bash scripts/maple/few_shot.sh DATASET SHOTS SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run few_shot --scripts-folder maple "$@"
