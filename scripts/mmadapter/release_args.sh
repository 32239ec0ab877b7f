# Sourced by the scripts of this folder (the MMA release's script names, ZjjConan/Multi-Modal-Adapter
# scripts/mmadapter/): the release passes the config name and the epoch to load as positional
# arguments (base2new_train.sh DATASET SEED CFG, base2new_test.sh DATASET SEED CFG LOADEP,
# xd_train.sh SEED CFG, xd_test.sh DATASET SEED CFG LOADEP); python -m vlprompt.run reads them from
# CFG and LOADEP. Config options (KEY VALUE pairs, KEY like TRAINER.MMADAPTER.PREC) may follow.
REPO=$(cd "$(dirname "$0")/../.." && pwd)

is_option_key() { [[ "$1" =~ ^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$ ]]; }

# release_args N "$@": positional argument N (1-based), when given and not a config option, is CFG.
release_cfg() {
    local n=$1; shift
    if [ $# -ge "$n" ] && ! is_option_key "${!n}"; then export CFG="${!n}"; return 0; fi
    return 1
}

# run TASK POSITIONAL... -- OPTIONS...: python -m vlprompt.run for MMA
run_mma() {
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m vlprompt.run "$1" --scripts-folder mma "${@:2}"
}
