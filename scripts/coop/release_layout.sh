# Sourced by main.sh and eval.sh (CoOp's release commands, in the release's output folders):
# the checks and the finished-run rule of python -m vlprompt.run.
check_inputs() {  # DATASET CFG
    if [ -z "$DATA" ]; then
        echo "Set DATA to the folder that holds your datasets (CoOp's layout, see README: Datasets), e.g.  export DATA=/data/coop_datasets" >&2
        return 2
    fi
    if [ ! -f "$REPO/configs/datasets/$1.yaml" ]; then
        echo "unknown dataset '$1': no $REPO/configs/datasets/$1.yaml" >&2
        return 2
    fi
    if [ ! -f "$REPO/configs/trainers/CoOp/$2.yaml" ]; then
        echo "CFG=$2: no $REPO/configs/trainers/CoOp/$2.yaml (configs of CoOp: $(cd "$REPO/configs/trainers/CoOp" && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' '))" >&2
        return 2
    fi
}

finished() {  # FOLDER train|test: whether the run in FOLDER logged its final result
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python}" -c \
        "import sys; from vlprompt.experiments.results import finished; sys.exit(0 if finished(sys.argv[1], sys.argv[2]) else 1)" "$1" "$2"
}

run_train_py() {  # train.py ARGS...: CoOp on $DATA
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python}" "$REPO/train.py" --root "$DATA" --trainer CoOp "$@"
}
