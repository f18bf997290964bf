#!/usr/bin/env bash
# Set up .venv and run the whole test suite (lint included). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# The example third-party plugin is installed like a user would install it.
pip install -q --no-deps -e examples/distill-logging-teacher
ruff check .
python -m pytest "$@"
