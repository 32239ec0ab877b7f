#!/usr/bin/env bash
# IVLP language-only (no visual prompt), under the release's name for this script
# (muzairkhattak/multimodal-prompt-learning: scripts/language-prompting/xd_train_lp.sh).
# Cross-dataset, step 1: train on all classes of DATASET (16 shots).
# usage: DATA=/path/to/datasets bash scripts/language-prompting/xd_train_lp.sh DATASET SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
CFG="${CFG:-vit_b16_c2_ep5_batch4_4ctx_language_only}" PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run xd_train IVLP "$@"
