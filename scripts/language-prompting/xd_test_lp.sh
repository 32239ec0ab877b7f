#!/usr/bin/env bash
# IVLP language-only (no visual prompt), under the release's name for this script
# (muzairkhattak/multimodal-prompt-learning: scripts/language-prompting/xd_test_lp.sh).
# Cross-dataset, step 2: evaluate the last-epoch model trained on SOURCE (default imagenet) on
# DATASET (the release's script asks for epoch 2, which its 5-epoch recipe never saves).
# usage: DATA=/path/to/datasets bash scripts/language-prompting/xd_test_lp.sh DATASET SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
CFG="${CFG:-vit_b16_c2_ep5_batch4_4ctx_language_only}" PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run xd_test IVLP "$@"
