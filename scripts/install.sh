#!/usr/bin/env bash
# Install the toolkit: PyPI packages, then Dassl.pytorch (it is not on PyPI) unless `import dassl`
# already works: from DASSL_SRC, a local copy of its repository, when set, else from GitHub.
# Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DASSL_COMMIT=c61a1b570ac6333bd50fb5ae06aea59002fb20bb  # upstream main, Oct 2022
DASSL_URL=https://github.com/KaiyangZhou/Dassl.pytorch

"$PYTHON" -m pip install -q -r requirements.txt
if "$PYTHON" -c "import dassl" 2>/dev/null; then
    echo "Dassl.pytorch: already installed"
    exit 0
fi
# --no-deps: its setup.py pins old linters; what it needs at run time is in requirements.txt.
# --no-build-isolation: its setup.py imports numpy.
if [ -n "${DASSL_SRC:-}" ]; then
    if [ ! -f "$DASSL_SRC/setup.py" ]; then
        echo "DASSL_SRC=$DASSL_SRC is not a copy of Dassl.pytorch (no setup.py there)" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation "$DASSL_SRC"
    echo "Dassl.pytorch: installed from $DASSL_SRC"
    exit 0
fi
if ! "$PYTHON" -m pip install -q --no-deps --no-build-isolation "git+${DASSL_URL}@${DASSL_COMMIT}"; then
    cat >&2 <<MESSAGE

Could not install Dassl.pytorch from GitHub (it is not on PyPI). If this machine cannot reach
GitHub, copy the repository from one that can, at commit ${DASSL_COMMIT}:
    git clone ${DASSL_URL} && git -C Dassl.pytorch checkout ${DASSL_COMMIT}
then, here:
    DASSL_SRC=/path/to/Dassl.pytorch bash scripts/install.sh
MESSAGE
    exit 2
fi
