#!/usr/bin/env bash
# Sets up everything the test suite needs, then runs all of it:
#   bash scripts/test.sh [extra pytest arguments]
# System packages (as root, from Debian 12 or 13): chromium for the browser test, node/npm
# for Genkit's JS client, redis-server for the Redis tests, a Java runtime for Google's
# Firestore emulator. The emulator itself is the package google-cloud-cli-firestore-emulator
# from Google's apt repository, not Debian's: it is installed when that repository is
# configured; without it the Firestore tests are skipped with a loud line at the start and
# at the end of the run (README, "Tests"), and everything else runs.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v java >/dev/null || missing+=(default-jre-headless)
command -v redis-server >/dev/null || missing+=(redis-server)
emulator=google-cloud-cli-firestore-emulator
if [ "$(id -u)" = 0 ] && ! dpkg -s "$emulator" >/dev/null 2>&1 && [ -z "${FIRESTORE_EMULATOR_JAR:-}" ] \
  && apt-cache policy "$emulator" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
  missing+=("$emulator")
fi
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
.venv/bin/python -c 'import flask_durable_stream, gevent, gunicorn, playwright, google.cloud.firestore, firebase_admin, redis, genkit, genkit_flask, prometheus_client'
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
for d in tests/ai_sdk example_app; do (cd "$d" && npm ci --no-audit --no-fund --loglevel=error); done  # the AI SDK: its tests, the chat page

if [ -z "${DURABLE_STREAM_SKIP_FIRESTORE:-}" ]; then
  problem=$(.venv/bin/python -c '
from tests.support.firestore_emulator import EmulatorUnavailable, find_jar, find_java
try:
    find_jar(), find_java()
except EmulatorUnavailable as exc:
    print(exc)
')
  if [ -n "$problem" ]; then
    echo "!!! Firestore emulator unavailable: $problem." >&2
    echo "!!! The Firestore tests will be SKIPPED; everything else runs." >&2
    echo "!!! (DURABLE_STREAM_SKIP_FIRESTORE=0 makes them fail instead.)" >&2
    export DURABLE_STREAM_SKIP_FIRESTORE=1
  fi
fi
(cd tests/ds && npm ci --no-audit --no-fund --loglevel=error)

exec .venv/bin/python -m pytest "$@"
