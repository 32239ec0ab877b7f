#!/usr/bin/env bash
# IVLP, vision and language prompts, under the release's name for this script
# (muzairkhattak/multimodal-prompt-learning: scripts/independent-vlp/xd_test_ivlp.sh).
# Cross-dataset, step 2: evaluate the last-epoch model trained on SOURCE (default imagenet) on
# DATASET (the release's script asks for epoch 2, which its 5-epoch recipe never saves).
# usage: DATA=/path/to/datasets bash scripts/independent-vlp/xd_test_ivlp.sh DATASET SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run xd_test IVLP "$@"
