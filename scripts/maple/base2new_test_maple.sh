#!/usr/bin/env bash
# The release's name of base2new_test.sh: evaluate the base-trained model (its last epoch) on the new half.
# usage: DATA=/path/to/datasets bash scripts/maple/base2new_test_maple.sh DATASET SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run base2new_test --scripts-folder maple "$@"
