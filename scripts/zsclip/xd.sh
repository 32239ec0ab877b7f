#!/usr/bin/env bash
# Zero-shot CLIP on all classes of DATASET (cross-dataset / domain generalisation rows), in the
# layout of xd_test.sh: output/evaluation/ZeroshotCLIP/<cfg>/<dataset>/seed1.
# usage: DATA=/path/to/datasets bash scripts/zsclip/xd.sh DATASET [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run xd --scripts-folder zsclip "$@"
