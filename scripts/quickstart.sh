#!/usr/bin/env bash
# From nothing to the main job on the bundled models: set up .venv, prepare (convert + verify)
# the bundled teacher and student, ask the teacher a few prompts, then `distill run`:
# generate → judge → sft → rl → eval → report (examples/quickstart.yaml; rerun to resume).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
distill models prepare smollm2-135m-instruct gemma-3-270m
distill ask -c examples/quickstart.yaml
distill run -c examples/quickstart.yaml
