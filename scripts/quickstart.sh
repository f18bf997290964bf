#!/usr/bin/env bash
# From nothing to the main job on the bundled models: set up .venv, prepare (convert + verify)
# the bundled teacher, ask it a few prompts, and generate a small dataset (examples/quickstart.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
distill models prepare smollm2-135m-instruct
distill ask -c examples/quickstart.yaml
distill generate -c examples/quickstart.yaml
