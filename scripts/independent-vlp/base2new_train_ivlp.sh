#!/usr/bin/env bash
# IVLP, vision and language prompts, under the release's name for this script
# (muzairkhattak/multimodal-prompt-learning: scripts/independent-vlp/base2new_train_ivlp.sh).
# Base-to-new, step 1: train on the base half of the classes (16 shots).
# usage: DATA=/path/to/datasets bash scripts/independent-vlp/base2new_train_ivlp.sh DATASET SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run base2new_train IVLP "$@"
