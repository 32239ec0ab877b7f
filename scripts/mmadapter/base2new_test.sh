#!/usr/bin/env bash
# MMA under the release's script name. Base-to-new, step 2: evaluate the base-trained model (its
# last epoch) on the new half.
# usage: DATA=/path/to/datasets bash scripts/mmadapter/base2new_test.sh DATASET SEED [CFG [LOADEP]] [CONFIG OPTIONS...]
#        (the release's form: DATASET SEED CFG LOADEP, e.g. caltech101 1 vit_b16_ep5 5)
source "$(dirname "$0")/release_args.sh"
if release_cfg 3 "$@"; then
    if [ $# -ge 4 ] && ! is_option_key "$4"; then
        # the last epoch is what base2new_test loads: say so rather than load another one silently
        last=$(PYTHONPATH="$REPO" python - "$CFG" <<'PY'
import sys
from vlprompt.experiments import run
try:  # the recipe's last epoch; an unknown CFG is one line on stderr, as python -m vlprompt.run says it
    print(run.config_max_epoch(run.resolve_config(run.get_method("MMA"), "base2new", "", sys.argv[1])[1]))
except run.UsageError as err:
    sys.exit(str(err))
PY
) || exit 2
        if [ "$4" != "$last" ]; then
            echo "LOADEP=$4: base2new_test evaluates the last epoch of CFG=$CFG ($last); pass $last or leave it out" >&2
            exit 2
        fi
        set -- "${@:1:2}" "${@:5}"
    else
        set -- "${@:1:2}" "${@:4}"
    fi
fi
run_mma base2new_test "$@"
