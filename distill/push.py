"""`distill push`: a finished generate run goes to a Hub dataset repo, a trained adapter to a Hub
model repo, each with its card. The files are first copied to a staging folder and scanned for
secrets (the values of environment variables that hold keys and tokens); a dry run stops there and
lists what would be uploaded."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError
from distill.models import PICKLE_SUFFIXES
from distill.runstore import MANIFEST

# What a dataset repo gets from a generate run: the card, the data, and its provenance.
DATASET_FILES = ["README.md", "instructions.parquet", "alpaca.json", MANIFEST]
# Environment variables whose values must never leave the machine in a pushed file.
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)


@dataclass
class PushPlan:
    repo_type: str  # "dataset" or "model"
    files: list[Path]  # top-level files of the source folder, uploaded under their own names


def plan_push(path: Path) -> PushPlan:
    """The repo type and files for ``path``: a finished generate run or a trained adapter."""
    if (path / "adapter_config.json").is_file():
        if not (path / "adapter_model.safetensors").is_file():
            raise DistillError(
                f"{path}: no adapter_model.safetensors; push the output dir of a finished `distill train`"
            )
        # Top-level files only: checkpoints and TensorBoard logs stay home; so do pickles, and
        # dotfiles (a run lock left by a killed run names a pid, a host and a command line).
        files = [
            f
            for f in sorted(path.iterdir())
            if f.is_file()
            and f.suffix not in PICKLE_SUFFIXES
            and not f.name.endswith((".tmp", ".partial"))
            and not f.name.startswith(".")
        ]
        return PushPlan("model", files)
    if (path / "instructions.jsonl").is_file():
        manifest = path / MANIFEST
        if not manifest.is_file() or json.loads(manifest.read_text()).get("stage") != "generate":
            raise DistillError(f"{path}: the generate run has not finished; run `distill generate` again first")
        missing = [name for name in DATASET_FILES if not (path / name).is_file()]
        if missing:
            raise DistillError(f"{path}: missing {', '.join(missing)}; rerun `distill generate` to rewrite them")
        return PushPlan("dataset", [path / name for name in DATASET_FILES])
    raise DistillError(f"{path}: neither a generate run dir nor a trained adapter dir; nothing to push")


def secret_values() -> dict[str, str]:
    """Name → value of the environment variables that look like keys or tokens (8+ characters)."""
    return {name: value for name, value in os.environ.items() if SECRET_NAME.search(name) and len(value) >= 8}


def stage(plan: PushPlan, staging: Path) -> list[tuple[str, int]]:
    """Copy the files to ``staging`` and refuse if any holds a secret; return (name, bytes) pairs."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    secrets = secret_values()
    listed = []
    for source in plan.files:
        target = staging / source.name
        shutil.copyfile(source, target)
        data = target.read_bytes()
        for name, value in secrets.items():
            if value.encode() in data:
                shutil.rmtree(staging)
                raise DistillError(f"{source} contains the value of ${name}; not pushing: remove it first")
        listed.append((source.name, len(data)))
    return listed


def upload(plan: PushPlan, staging: Path, repo_id: str, private: bool) -> str:
    """Create the repo if needed and upload the staged folder in one commit; return the commit URL.
    The token comes from huggingface_hub itself (HF_TOKEN or `hf auth login`)."""
    import httpx2  # huggingface_hub's HTTP client: its connection errors are not OSErrors
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type=plan.repo_type, private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=staging, repo_id=repo_id, repo_type=plan.repo_type, commit_message="distill push"
        )
    except (httpx2.HTTPError, OSError) as exc:
        raise DistillError(f"push to {repo_id} failed: {exc}; check the repo id, HF_TOKEN and the network") from None
    return str(commit.commit_url)
