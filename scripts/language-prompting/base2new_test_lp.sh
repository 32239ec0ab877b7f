#!/usr/bin/env bash
# IVLP language-only (no visual prompt), under the release's name for this script
# (muzairkhattak/multimodal-prompt-learning: scripts/language-prompting/base2new_test_lp.sh).
# Base-to-new, step 2: evaluate the trained model on the new half of the classes.
# usage: DATA=/path/to/datasets bash scripts/language-prompting/base2new_test_lp.sh DATASET SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
CFG="${CFG:-vit_b16_c2_ep5_batch4_4ctx_language_only}" PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run base2new_test IVLP "$@"
