#!/usr/bin/env bash
# CoOp few-shot, the release's command (scripts/coop/main.sh of KaiyangZhou/CoOp and
# muzairkhattak/multimodal-prompt-learning): seeds 1, 2 and 3 of DATASET with SHOTS images per class,
# config CFG (configs/trainers/CoOp/CFG.yaml), class token position CTP (end, middle or front),
# NCTX context tokens and class-specific context CSC (True or False). The release's folders:
# $OUTPUT/DATASET/CoOp/CFG_SHOTSshots/nctxNCTX_cscCSC_ctpCTP/seedSEED (OUTPUT defaults to output);
# finished seeds are skipped, unfinished ones resume.
# usage: DATA=/path/to/datasets bash scripts/coop/main.sh DATASET CFG CTP NCTX SHOTS CSC [CONFIG OPTIONS...]
REPO=$(cd "$(dirname "$0")/../.." && pwd)
if [ $# -lt 6 ]; then
    echo "usage: DATA=/path/to/datasets bash scripts/coop/main.sh DATASET CFG CTP NCTX SHOTS CSC [CONFIG OPTIONS...]" >&2
    exit 2
fi
DATASET=$1 CFG=$2 CTP=$3 NCTX=$4 SHOTS=$5 CSC=$6
shift 6
. "$REPO/scripts/coop/release_layout.sh"
check_inputs "$DATASET" "$CFG" || exit 2
for SEED in 1 2 3; do
    DIR=${OUTPUT:-output}/${DATASET}/CoOp/${CFG}_${SHOTS}shots/nctx${NCTX}_csc${CSC}_ctp${CTP}/seed${SEED}
    if finished "$DIR" train; then
        echo "Results are available in ${DIR}: skipping (delete the folder to rerun)"
        continue
    fi
    echo "Run this job and save the output to ${DIR}"
    run_train_py --seed "$SEED" --dataset-config-file "$REPO/configs/datasets/${DATASET}.yaml" \
        --config-file "$REPO/configs/trainers/CoOp/${CFG}.yaml" --output-dir "$DIR" \
        TRAINER.COOP.N_CTX "$NCTX" TRAINER.COOP.CSC "$CSC" TRAINER.COOP.CLASS_TOKEN_POSITION "$CTP" \
        DATASET.NUM_SHOTS "$SHOTS" "$@" || exit $?
done
