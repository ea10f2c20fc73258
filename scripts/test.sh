#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh machine, then runs it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch first: a plain `torch` requirement would pull a multi-GB CUDA build. torch==2.13.0 is a CPU build that
# these machines keep on local disk; anywhere else it comes from the package index.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -e ".[test]"

# A real browser for the dashboard tests (Debian's chromium + chromedriver).
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "scripts/test.sh: chromium/chromedriver missing and cannot apt-get them; browser tests will be skipped" >&2
  fi
fi

"$PY" -m ruff check .
"$PY" -m pytest "$@"
