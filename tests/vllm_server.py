"""Start a real vLLM OpenAI-compatible server on 127.0.0.1 (used by the test fixtures and bench/)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def start_vllm_server(
    model_dir: Path, served_name: str, port: int, log_path: Path | None = None, timeout_s: float = 600
) -> subprocess.Popen[bytes]:
    """Start the server on the bundled model (float32: fastest on CPUs) and wait until it answers."""
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--dtype",
        "float32",
    ]
    log = log_path.open("wb") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            tail = log_path.read_text()[-4000:] if log_path else ""
            raise RuntimeError(f"vLLM server exited with {process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as response:
                if response.status == 200:
                    return process
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"vLLM server did not answer in {timeout_s} s")
        time.sleep(2)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
