#!/usr/bin/env bash
# EdgeCNN on a facial expression dataset (fer2013 or rafdb): train, then ten-crop test; the config
# defaults to the dataset's recipe, configs/trainers/EdgeCNN/<dataset>.yaml.
# usage: DATA=/path/to/datasets bash scripts/edgecnn/train.sh DATASET SEED [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run train --scripts-folder edgecnn "$@"
