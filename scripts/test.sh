#!/usr/bin/env bash
# Sets up everything the test suite needs, then runs all of it:
#   bash scripts/test.sh [extra pytest arguments]
# System packages (as root, from Debian): chromium for the browser test, node/npm for
# Genkit's JS client, redis-server for the Redis tests, Java for Google's Firestore
# emulator (the emulator itself is the Debian package google-cloud-cli-firestore-emulator,
# which cannot be installed from Debian's own archive; see README, "Tests").
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v redis-server >/dev/null || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing system packages (install them as root): ${missing[*]}" >&2
    exit 1
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c 'import flask_durable_stream, gevent, gunicorn, playwright, google.cloud.firestore, firebase_admin, redis'
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
(cd tests/ds && npm ci --no-audit --no-fund --loglevel=error)

exec .venv/bin/python -m pytest "$@"
