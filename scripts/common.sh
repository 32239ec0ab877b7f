# Shared by the task scripts: the data root, the output root, and run bookkeeping.
# Source it as `source common.sh N "ARGS" "$@"` (N = required arguments); it sets REPO (the
# toolkit's folder), DATA and OUTPUT.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ $(($# - 2)) -lt "$1" ]; then
    echo "usage: DATA=/path/to/datasets bash ${USAGE_NAME:-$0} $2 [CONFIG OPTIONS...]" >&2
    exit 2
fi
if [ -z "${DATA:-}" ]; then
    echo "Set DATA to the folder that holds your datasets (CoOp's layout, see README: Datasets)," >&2
    echo "e.g.  export DATA=/data/coop_datasets" >&2
    exit 2
fi
OUTPUT=${OUTPUT:-output}  # relative to where you run the script, as in CoOp/MaPLe
PYTHON=${PYTHON:-python}

# finished DIR train|test: the run in DIR logged its final evaluation.
finished() {
    local dir=$1 kind=$2 marker
    [ "$kind" = train ] && marker='^Finish(ed)? training' || marker='^=> result'
    for log in "$dir"/log.txt*; do
        [ -f "$log" ] || continue
        if grep -Eq "$marker" "$log" && sed -En "/$marker/,\$p" "$log" | grep -q '^\* accuracy'; then
            return 0
        fi
    done
    return 1
}

# config_value FILE KEY: a scalar from one of our yaml configs (e.g. MAX_EPOCH).
config_value() {
    grep -E "^\s*$2:" "$1" | head -n 1 | sed -E "s/^\s*$2:\s*//; s/\"//g"
}

# run_once DIR train|test ARGS...: skip a finished run; start or resume (same folder) the others.
run_once() {
    local dir=$1 kind=$2
    shift 2
    if finished "$dir" "$kind"; then
        echo "Results are available in $dir: skipping (delete the folder to rerun)"
        return 0
    fi
    if [ -d "$dir" ]; then
        echo "Resuming the unfinished run in $dir"
    else
        echo "Run this job and save the output to $dir"
    fi
    "$PYTHON" "$REPO/train.py" --output-dir "$dir" "$@"
}

# launch DIR train|test DATASET SEED CONFIG_FILE [train.py options...]: run_once with the
# arguments every run of $TRAINER shares.
launch() {
    local dir=$1 kind=$2 dataset=$3 seed=$4 config=$5
    shift 5
    local dataset_config=$REPO/configs/datasets/${dataset}.yaml
    if [ ! -f "$dataset_config" ]; then
        echo "Unknown dataset '$dataset': no $dataset_config" >&2
        exit 2
    fi
    run_once "$dir" "$kind" --root "$DATA" --seed "$seed" --trainer "$TRAINER" \
        --dataset-config-file "$dataset_config" --config-file "$config" "$@"
}
