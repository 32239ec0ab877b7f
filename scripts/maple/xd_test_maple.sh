#!/usr/bin/env bash
# The release's name of xd_test.sh: evaluate the model trained on SOURCE (default imagenet) on DATASET.
# usage: DATA=/path/to/datasets bash scripts/maple/xd_test_maple.sh DATASET SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run xd_test --scripts-folder maple "$@"
