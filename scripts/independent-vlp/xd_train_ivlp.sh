#!/usr/bin/env bash
# IVLP, vision and language prompts, under the release's name for this script
# (muzairkhattak/multimodal-prompt-learning: scripts/independent-vlp/xd_train_ivlp.sh).
# Cross-dataset, step 1: train on all classes of DATASET (16 shots).
# usage: DATA=/path/to/datasets bash scripts/independent-vlp/xd_train_ivlp.sh DATASET SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run xd_train IVLP "$@"
