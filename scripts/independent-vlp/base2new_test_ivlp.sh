#!/usr/bin/env bash
# IVLP, vision and language prompts, under the release's name for this script
# (muzairkhattak/multimodal-prompt-learning: scripts/independent-vlp/base2new_test_ivlp.sh).
# Base-to-new, step 2: evaluate the trained model on the new half of the classes.
# usage: DATA=/path/to/datasets bash scripts/independent-vlp/base2new_test_ivlp.sh DATASET SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run base2new_test IVLP "$@"
