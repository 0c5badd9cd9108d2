#!/usr/bin/env bash
# Sets up and runs the example app on the embedded default backend:
#   bash scripts/example.sh            -> http://127.0.0.1:5000/
# PORT=8000 bash scripts/example.sh to use another port.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[gunicorn]' 2>&1 | grep -v '^WARNING: Location' || true
# The chat page (/chat) loads the AI SDK from example_app/node_modules: install it when npm is here.
if command -v npm >/dev/null && [ ! -d example_app/node_modules/ai ]; then
  (cd example_app && npm ci --no-audit --no-fund --loglevel=error) || echo "npm ci failed: /chat will not load" >&2
fi
exec .venv/bin/python -m example_app --port "${PORT:-5000}"
