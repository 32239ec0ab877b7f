#!/usr/bin/env bash
# CoOp cross-dataset evaluation, the release's command (scripts/coop/eval.sh): the 16-shot ImageNet
# models of main.sh (N_CTX 16, CSC False, CTP end, seeds 1-3, epoch 50) on all classes of DATASET,
# written to $OUTPUT/evaluation/CoOp/CFG_16shots/nctx16_cscFalse_ctpend/DATASET/seedSEED.
# usage: DATA=/path/to/datasets bash scripts/coop/eval.sh DATASET CFG [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
if [ $# -lt 2 ]; then
    echo "usage: DATA=/path/to/datasets bash scripts/coop/eval.sh DATASET CFG [CONFIG OPTIONS...]" >&2
    exit 2
fi
DATASET=$1 CFG=$2
shift 2
. "$REPO/scripts/coop/release_layout.sh"
check_inputs "$DATASET" "$CFG" || exit 2
SETTING=${CFG}_16shots/nctx16_cscFalse_ctpend
for SEED in 1 2 3; do
    MODEL_DIR=${OUTPUT:-output}/imagenet/CoOp/${SETTING}/seed${SEED}
    DIR=${OUTPUT:-output}/evaluation/CoOp/${SETTING}/${DATASET}/seed${SEED}
    if finished "$DIR" test; then
        echo "Results are available in ${DIR}: skipping (delete the folder to rerun)"
        continue
    fi
    if ! finished "$MODEL_DIR" train; then
        echo "No finished training in ${MODEL_DIR}: run bash scripts/coop/main.sh imagenet ${CFG} end 16 16 False first" >&2
        exit 1
    fi
    run_train_py --seed "$SEED" --dataset-config-file "$REPO/configs/datasets/${DATASET}.yaml" \
        --config-file "$REPO/configs/trainers/CoOp/${CFG}.yaml" --output-dir "$DIR" \
        --model-dir "$MODEL_DIR" --load-epoch 50 --eval-only \
        TRAINER.COOP.N_CTX 16 TRAINER.COOP.CSC False TRAINER.COOP.CLASS_TOKEN_POSITION end "$@" || exit $?
done
