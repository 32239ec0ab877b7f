#!/usr/bin/env bash
# End-to-end demo with no download: the toy world (a synthetic image-caption world written in
# CoOp's dataset layout) and the small CLIP pretrained on it (vlprompt/toyworld/toy_clip.pt),
# through the real base-to-new scripts, train.py and parse_test_res.py, on the CPU.
# Zero-shot CLIP, then each method trained on the 18 base classes of ToyObjects (16 shots, two
# seeds) and tested on the 18 new ones; prints the Base/New/HM table.
# usage: bash scripts/demo.sh [DEMO_DIR]     (default: demo_output)
#        METHODS="CoOp HiCroPL" SEEDS="1" bash scripts/demo.sh   (any of: CoOp CoCoOp IVLP MaPLe PromptSRC DCP HiCroPL)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEMO=$(mkdir -p "${1:-demo_output}" && cd "${1:-demo_output}" && pwd)
cd "$REPO"
export DATA=$DEMO/data OUTPUT=$DEMO/output CFG=demo_toy PYTHONWARNINGS=ignore
export VLPROMPT_CACHE=$DEMO/cache
METHODS=${METHODS:-"CoOp HiCroPL"}
SEEDS=${SEEDS:-"1 2"}
DATASET=toy_objects
TOY=(MODEL.BACKBONE.PATH "$REPO/vlprompt/toyworld/toy_clip.pt" DATASET.DESCRIPTIONS_DIR "$DATA/gpt_file")
START=$SECONDS

echo "== the toy world's ToyObjects dataset in $DATA (synthetic, 32x32 images, CoOp's layout)"
[ -f "$DATA/toy_objects/split_zhou_ToyObjects.json" ] || python -m datasets.toy_world "$DATA" --dataset ToyObjects

# Runs one task script; shows Dassl's own progress line at the end of each epoch (with its ETA),
# keeps the whole output in $DEMO/last_run.txt and shows its end if the run fails.
run() {
    local status=0
    "$@" 2>&1 | tee "$DEMO/last_run.txt" \
        | { grep --line-buffered -E '^epoch \[[0-9]+/[0-9]+\] batch \[([0-9]+)/\1\]' || true; } \
        | sed -u -E 's/^epoch \[([0-9]+\/[0-9]+)\].* loss ([0-9.]+) \(([0-9.]+)\).* acc ([0-9.]+) \(([0-9.]+)\).* eta ([0-9:]+).*/    epoch \1  loss \3  train acc \5%  eta \6/' \
        || status=$?
    [ "$status" = 0 ] || { echo "failed; the end of its output ($DEMO/last_run.txt):"; tail -n 30 "$DEMO/last_run.txt"; exit 1; }
}

echo "== ZeroshotCLIP: the toy CLIP with prompt templates, base and new classes"
run bash scripts/zsclip/base2new.sh "$DATASET" "${TOY[@]}"
for method in $METHODS; do
    script=scripts/${method,,}
    for seed in $SEEDS; do
        echo "== $method seed $seed: train on the base classes (5 epochs), then test on the new ones"
        run bash "$script/base2new_train.sh" "$DATASET" "$seed" "${TOY[@]}"
        run bash "$script/base2new_test.sh" "$DATASET" "$seed" "${TOY[@]}"
    done
done

echo "== HiCroPL over the seeds (parse_test_res.py, as for CoOp/MaPLe/PromptSRC runs)"
python parse_test_res.py "$OUTPUT/base2new/test_new/$DATASET/shots_16/HiCroPL/$CFG" --test-log | tail -n 3
python parse_test_res.py "$OUTPUT/base2new" --base2new --trainer HiCroPL --cfg "$CFG" | grep -v "^Saved"
echo "== the comparison report (SYNTHETIC data: not comparable with published results)"
python -m vlprompt.report --task base2new --output "$OUTPUT" --datasets "$DATASET" --seeds $SEEDS \
    --method CLIP=ZeroshotCLIP/$CFG $(for m in $METHODS; do printf -- "--method %s/%s " "$m" "$CFG"; done) \
    --out "$DEMO/report" 2>&1 | grep -v -e "^Saved" -e "^Mean ± std over seeds" -e "^note: SYNTHETIC"
echo
echo "Chance is 1/18 = 5.6% on each half. Took $((SECONDS - START)) s."
echo "Run folders (log.txt, checkpoints): $OUTPUT/base2new/{train_base,test_base,test_new}/$DATASET/shots_16/<method>/$CFG/seed<N>"
echo "Report (Markdown, CSV, figures): $DEMO/report"
