#!/usr/bin/env bash
# End-to-end demo with no download: the toy world (a synthetic image-caption world written in
# CoOp's dataset layout) and the small CLIP pretrained on it (vlprompt/toyworld/toy_clip.pt),
# through the real base-to-new scripts, train.py and parse_test_res.py, on the CPU.
# Zero-shot CLIP, then each method trained on the 18 base classes of ToyObjects (16 shots, two
# seeds) and tested on the 18 new ones; prints the Base/New/HM table.
# usage: bash scripts/demo.sh [DEMO_DIR]     (default: demo_output)
#        METHODS="CoOp HiCroPL" SEEDS="1" bash scripts/demo.sh   (any registered prompt methods)
#        METHODS=all bash scripts/demo.sh                          (every registered prompt method)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEMO=$(mkdir -p "${1:-demo_output}" && cd "${1:-demo_output}" && pwd)
cd "$REPO"
export DATA=$DEMO/data OUTPUT=$DEMO/output CFG=demo_toy PYTHONWARNINGS=ignore
export VLPROMPT_CACHE=$DEMO/cache
# On the CPU unless asked (VLPROMPT_DEVICE=cuda bash scripts/demo.sh): its numbers are the same on
# every run there; on a GPU they vary in the last digits (cuDNN autotuning, nondeterministic kernels).
export VLPROMPT_DEVICE=${VLPROMPT_DEVICE:-cpu}
METHODS=${METHODS:-"CoOp HiCroPL"}
SEEDS=${SEEDS:-"1 2"}
DATASET=toy_objects
TOY=(MODEL.BACKBONE.PATH "$REPO/vlprompt/toyworld/toy_clip.pt" DATASET.DESCRIPTIONS_DIR "$DATA/gpt_file")
START=$SECONDS

# "NAME SCRIPTS_FOLDER" per method to train (all: every registered prompt method that trains)
LISTED=$(python - $METHODS <<'PY'
import sys
from vlprompt.methods.registry import get_method, prompt_methods
names = sys.argv[1:]
try:
    specs = [m for m in prompt_methods() if m.trains] if names == ["all"] else [get_method(n) for n in names]
except KeyError as err:
    sys.exit(f"METHODS: {err.args[0]}")
for spec in specs:
    print(spec.name, spec.scripts_folder)
PY
) || { rmdir "$DEMO" 2>/dev/null; exit 2; }
TRAINED=$(echo "$LISTED" | cut -d" " -f1 | tr "\n" " ")
# the method whose seeds parse_test_res.py shows: HiCroPL when it ran, else the last one
SHOWN=$(echo "$LISTED" | awk '$1 == "HiCroPL" {h = $1} {last = $1} END {print h ? h : last}')

echo "== the toy world's ToyObjects dataset in $DATA (synthetic, 32x32 images, CoOp's layout)"
[ -f "$DATA/toy_objects/split_zhou_ToyObjects.json" ] || python -m datasets.toy_world "$DATA" --dataset ToyObjects

# Runs one task script; shows Dassl's own progress line at the end of each epoch and the time left
# at the average epoch time (Dassl's "eta" extrapolates the slow first batches: minutes for a
# one-minute run), keeps the whole output in $DEMO/last_run.txt and shows its end if the run fails.
run() {
    local status=0
    "$@" < /dev/null 2>&1 | tee "$DEMO/last_run.txt" \
        | { grep --line-buffered -E '^epoch \[[0-9]+/[0-9]+\] batch \[([0-9]+)/\1\]|^epoch [0-9]+/[0-9]+ took' || true; } \
        | sed -u -E -e 's/^epoch \[([0-9]+\/[0-9]+)\].* loss ([0-9.]+) \(([0-9.]+)\).* acc ([0-9.]+) \(([0-9.]+)\).*/    epoch \1  loss \3  train acc \5%/' \
            -e 's/^epoch [0-9]+\/[0-9]+ took ([0-9.]+) s; ([0-9:]+) left.*/      took \1 s, \2 left/' \
        || status=$?
    [ "$status" = 0 ] || { echo "failed; the end of its output ($DEMO/last_run.txt):"; tail -n 30 "$DEMO/last_run.txt"; exit 1; }
}

echo "== ZeroshotCLIP: the toy CLIP with prompt templates, base and new classes"
run bash scripts/zsclip/base2new.sh "$DATASET" "${TOY[@]}"
while read -r method folder; do
    script=scripts/$folder
    for seed in $SEEDS; do
        echo "== $method seed $seed: train on the base classes (5 epochs), then test on the new ones"
        run bash "$script/base2new_train.sh" "$DATASET" "$seed" "${TOY[@]}"
        run bash "$script/base2new_test.sh" "$DATASET" "$seed" "${TOY[@]}"
    done
done <<< "$LISTED"

echo "== $SHOWN over the seeds (parse_test_res.py, as for CoOp/MaPLe/PromptSRC runs)"
python parse_test_res.py "$OUTPUT/base2new/test_new/$DATASET/shots_16/$SHOWN/$CFG" --test-log | tail -n 3
python parse_test_res.py "$OUTPUT/base2new" --base2new --trainer "$SHOWN" --cfg "$CFG" | grep -v "^Saved"
echo "== the comparison report (SYNTHETIC data: not comparable with published results)"
python -m vlprompt.report --task base2new --output "$OUTPUT" --datasets "$DATASET" --seeds $SEEDS \
    --method CLIP=ZeroshotCLIP/$CFG $(for m in $TRAINED; do printf -- "--method %s/%s " "$m" "$CFG"; done) \
    --out "$DEMO/report" 2>&1 | grep -v -e "^Saved" -e "^Mean ± std over seeds" -e "^note: SYNTHETIC"
NEW_CLASSES=$(python -c "from vlprompt.toyworld.world import CLASS_SETS; print(','.join(CLASS_SETS['ToyObjects'].classnames[18:]))")
IMAGE="$DATA/toy_objects/images/$(echo "${NEW_CLASSES%%,*}" | tr " " _)/test_000.png"
echo "== one prediction: $SHOWN (seed ${SEEDS%% *}) on a new class's image, the 18 new class names given on the command line"
python -m vlprompt.predict "$OUTPUT/base2new/train_base/$DATASET/shots_16/$SHOWN/$CFG/seed${SEEDS%% *}" "$IMAGE" \
    --classes "$NEW_CLASSES" --topk 3
echo
echo "Chance is 1/18 = 5.6% on each half. Took $((SECONDS - START)) s."
echo "Run folders (log.txt, checkpoints): $OUTPUT/base2new/{train_base,test_base,test_new}/$DATASET/shots_16/<method>/$CFG/seed<N>"
echo "Report (Markdown, CSV, figures): $DEMO/report"
