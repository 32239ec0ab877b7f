#!/usr/bin/env bash
# Zero-shot CLIP on the base and the new half of the classes, in the base-to-new layout (test_base/
# and test_new/, seed1), so parse_test_res.py --base2new puts it beside trained methods.
# usage: DATA=/path/to/datasets bash scripts/zsclip/base2new.sh DATASET [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run base2new --scripts-folder zsclip "$@"
