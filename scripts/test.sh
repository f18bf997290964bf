#!/usr/bin/env bash
# Set up .venv and run the whole test suite (lint included): what CI runs. Extra arguments go to
# pytest. `--fast` is the developer's lane: only the tests that need no model, server or browser
# (marker `slow` deselected), about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
if [ "${1:-}" = "--fast" ]; then
    shift
    exec python -m pytest -m "not slow" "$@"
fi
# As root (CI), setup.sh installed Chromium: a missing browser is then a failure, not a skip.
if [ "$(id -u)" -eq 0 ]; then
    export DISTILL_REQUIRE_BROWSER=1
fi
python -m pytest "$@"
