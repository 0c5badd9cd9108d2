#!/usr/bin/env bash
# Runs the chaos and limits suite and writes RELIABILITY.md from its results:
#   bash scripts/reliability.sh [extra pytest arguments]
# The file is written even when cases fail (they are listed in it); the exit status is pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest tests/chaos -p tests.chaos.report --reliability-md RELIABILITY.md "$@"
