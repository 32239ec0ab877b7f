#!/usr/bin/env bash
# End-to-end demo with no download: a synthetic dataset in CoOp's layout and a tiny random CLIP,
# through the real base-to-new scripts, train.py and parse_test_res.py (about a minute on CPU).
# usage: bash scripts/demo.sh [DEMO_DIR]   (default: demo_output)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEMO=$(mkdir -p "${1:-demo_output}" && cd "${1:-demo_output}" && pwd)
cd "$REPO"
export DATA=$DEMO/data OUTPUT=$DEMO/output CFG=demo_tiny_clip PYTHONWARNINGS=ignore
export VLPROMPT_CACHE=$DEMO/cache
CLIP_FILE=$DEMO/tiny_clip.pt
DATASETS="caltech101 eurosat"
SEEDS="1 2"

echo "== synthetic data and a tiny random CLIP in $DEMO"
[ -d "$DATA/eurosat" ] || python -m datasets.synthetic "$DATA" --dataset Caltech101 EuroSAT --classes 10
[ -f "$CLIP_FILE" ] || python -c "from vlprompt.clip.loading import save_random_clip as s; s('$CLIP_FILE')"

quietly() {  # the runs' own logs are in their output folders; show this one only on failure
    "$@" > "$DEMO/last_run.txt" 2>&1 || { tail -n 30 "$DEMO/last_run.txt"; exit 1; }
}
for dataset in $DATASETS; do
    for seed in $SEEDS; do
        echo "== $dataset seed $seed: train on base classes, test on new classes"
        quietly bash scripts/hicropl/base2new_train.sh "$dataset" "$seed" MODEL.BACKBONE.PATH "$CLIP_FILE"
        quietly bash scripts/hicropl/base2new_test.sh "$dataset" "$seed" MODEL.BACKBONE.PATH "$CLIP_FILE"
    done
done

echo "== per-seed results of one dataset (parse_test_res.py, CoOp's mode)"
python parse_test_res.py "$OUTPUT/base2new/test_new/caltech101/shots_16/HiCroPL/$CFG" --test-log
echo "== summary"
python parse_test_res.py "$OUTPUT/base2new" --base2new --trainer HiCroPL --cfg "$CFG"
