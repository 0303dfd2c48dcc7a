#!/usr/bin/env bash
# `make serve`: the OpenAI-compatible server on the bundled demo model.
# It says plainly what is missing instead of pretending, while the server or the demo model is not built yet.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
if ! "$PY" -c "import unigemma.server.run" >/dev/null 2>&1; then
    echo "make serve: the HTTP server (unigemma/server, issue 5) is not in this build yet; nothing to start." >&2
    exit 3
fi
if [ ! -f unigemma/demo/model/config.json ] && [ -z "${MODEL:-}" ]; then
    echo "make serve: no bundled demo model yet (unigemma/demo/model, issue 8). Run with MODEL=/path/to/checkpoint." >&2
    exit 3
fi
exec "$PY" -m unigemma.cli serve --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" ${MODEL:+--model "$MODEL"}
