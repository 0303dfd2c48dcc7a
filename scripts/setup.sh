#!/usr/bin/env bash
# Installs unigemma and what its tests need into the current Python, idempotently.
# torch comes first: a CPU build when none is installed, so that pip never pulls a multi-GB CUDA build.
# Every other package resolves within constraints.txt (versions the suite passed with; `make lock` rewrites it),
# so a new release of a dependency cannot turn the suite red. CONSTRAINTS= (empty) installs without it.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch 2.13.0 (CPU build)"
    "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
EXTRAS=${EXTRAS:-dev,server,train}
CONSTRAINTS=${CONSTRAINTS-constraints.txt}
stamp=".setup-stamp"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || { [ -n "$CONSTRAINTS" ] && [ "$CONSTRAINTS" -nt "$stamp" ]; } \
        || ! "$PY" -c "import unigemma" >/dev/null 2>&1; then
    echo "[setup] installing unigemma[$EXTRAS]${CONSTRAINTS:+ within $CONSTRAINTS}"
    "$PY" -m pip install -q --disable-pip-version-check ${CONSTRAINTS:+-c "$CONSTRAINTS"} -e ".[${EXTRAS}]"
    touch "$stamp"
fi
