#!/usr/bin/env bash
# Installs unigemma and what its tests need into the current Python, idempotently.
# torch comes first: a CPU build when none is installed, so that pip never pulls a multi-GB CUDA build.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch 2.13.0 (CPU build)"
    "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
EXTRAS=${EXTRAS:-dev,server,train}
stamp=".setup-stamp"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! "$PY" -c "import unigemma" >/dev/null 2>&1; then
    echo "[setup] installing unigemma[$EXTRAS]"
    "$PY" -m pip install -q --disable-pip-version-check -e ".[${EXTRAS}]"
    touch "$stamp"
fi
