#!/usr/bin/env bash
# Install the toolkit: PyPI packages, then Dassl.pytorch from GitHub (it is not on PyPI) unless
# `import dassl` already works. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DASSL_COMMIT=c61a1b570ac6333bd50fb5ae06aea59002fb20bb  # upstream main, Oct 2022

"$PYTHON" -m pip install -q -r requirements.txt
if "$PYTHON" -c "import dassl" 2>/dev/null; then
    echo "Dassl.pytorch: already installed"
else
    # --no-deps: its setup.py pins old linters; what it needs at run time is in requirements.txt.
    # --no-build-isolation: its setup.py imports numpy.
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation \
        "git+https://github.com/KaiyangZhou/Dassl.pytorch@${DASSL_COMMIT}"
fi
