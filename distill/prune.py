"""`distill models prune`: a depth-pruned copy of a model, the first half of the prune-then-distill
recipe (Minitron, Sheared-LLaMA): keep N evenly spaced decoder layers, renumber them, update the
config, save safetensors and the tokenizer. The result is an ordinary HF directory that the
``transformers`` and ``vllm`` teachers (and ``train.student``) load like any model, with the
teacher's tokenizer, so it can be distilled from the model it was cut from.

The weights are rewritten from the safetensors files directly (no model is built to prune), then
checked: the saved copy, loaded by transformers, must give the same logits (within
``LOGIT_TOLERANCE``) as the source model with the same layers removed in memory.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from distill.errors import ModelError
from distill.models import LOGIT_TOLERANCE, VERIFY_PROMPT, resolve_model

PRUNE_FILE = "distill-prune.json"
_LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<index>\d+)\.(?P<rest>.+)$")
# Files copied as they are: tokenizer, chat template, generation settings.
_COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def kept_layers(total: int, keep: int) -> list[int]:
    """``keep`` evenly spaced layer indices out of ``total``, always the first and the last (both
    matter most in depth-pruning studies): index round(i·(total−1)/(keep−1)), halves rounded up;
    e.g. 10 of 30: 0, 3, 6, 10, 13, 16, 19, 23, 26, 29."""
    if not 1 <= keep <= total:
        raise ModelError(f"--keep-layers: must be between 1 and the model's {total} layers, got {keep}")
    if keep == 1:
        return [total - 1]
    return sorted({int(i * (total - 1) / (keep - 1) + 0.5) for i in range(keep)})


def _pruned_config(config: dict[str, Any], keep: list[int]) -> dict[str, Any]:
    """The config with ``num_hidden_layers`` set and every per-layer list (``layer_types``, ...) cut
    to the kept layers; nested ``text_config`` (multimodal models) likewise."""
    total = config["num_hidden_layers"]
    pruned = {}
    for key, value in config.items():
        if isinstance(value, list) and len(value) == total and key != "architectures":
            value = [value[i] for i in keep]
        elif key == "text_config" and isinstance(value, dict) and "num_hidden_layers" in value:
            value = _pruned_config(value, keep)
        pruned[key] = value
    pruned["num_hidden_layers"] = len(keep)
    return pruned


def _layer_count(config: dict[str, Any]) -> int:
    if "num_hidden_layers" in config:
        return int(config["num_hidden_layers"])
    text = config.get("text_config")
    if isinstance(text, dict) and "num_hidden_layers" in text:
        return int(text["num_hidden_layers"])
    raise ModelError("config.json has no num_hidden_layers: not a decoder model distill can prune")


def _read_tensors(source: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{source}: no .safetensors weights to prune")
    tensors: dict[str, Any] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def prune_model(source: str, keep: int, out_dir: Path) -> dict[str, Any]:
    """Write a copy of ``source`` (alias, directory or hub id resolved by ``resolve_model``) with
    ``keep`` of its decoder layers into ``out_dir`` (atomically: the directory appears only once
    it is complete and verified); return the record saved as ``distill-prune.json``."""
    from safetensors.torch import save_file

    path = Path(resolve_model(source))
    if not path.is_dir():
        raise ModelError(f"model '{source}': pruning needs a local model directory or a bundled alias")
    config = json.loads((path / "config.json").read_text())
    total = _layer_count(config)
    keep_idx = kept_layers(total, keep)
    new_index = {old: new for new, old in enumerate(keep_idx)}
    tensors, renamed, dropped = _read_tensors(path), {}, 0
    for name, tensor in tensors.items():
        match = _LAYER_KEY.match(name)
        if match is None:
            renamed[name] = tensor
        elif int(match["index"]) in new_index:
            renamed[f"{match['prefix']}.{new_index[int(match['index'])]}.{match['rest']}"] = tensor.contiguous()
        else:
            dropped += 1
    if not dropped and keep < total:
        raise ModelError(f"{path}: no weights named '...layers.N...' found: cannot tell the decoder layers apart")

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(renamed, str(staging / "model.safetensors"), metadata={"format": "pt"})
    if "num_hidden_layers" in config:
        pruned = _pruned_config(config, keep_idx)
    else:  # multimodal: the decoder's settings are in text_config
        pruned = {**config, "text_config": _pruned_config(config["text_config"], keep_idx)}
    (staging / "config.json").write_text(json.dumps(pruned, indent=2))
    for name in _COPIED:
        if (path / name).is_file():
            shutil.copy2(path / name, staging / name)
    record = {
        "source": source,
        "source_path": str(path),
        "source_layers": total,
        "kept_layers": keep_idx,
        "layers": len(keep_idx),
        "parameters": int(sum(t.numel() for t in renamed.values())),
        "source_parameters": int(sum(t.numel() for t in tensors.values())),
    }
    record["verification"] = verify_pruned(path, staging, keep_idx)
    (staging / PRUNE_FILE).write_text(json.dumps(record, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return record


def verify_pruned(source: Path, pruned: Path, keep: list[int]) -> dict[str, Any]:
    """The saved copy vs the source with the same layers removed in memory (an independent path:
    module surgery, not key renaming): logits within ``LOGIT_TOLERANCE`` on ``VERIFY_PROMPT``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pruned)
    ids = torch.tensor([tokenizer(VERIFY_PROMPT).input_ids])
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
    decoder = reference.get_decoder()
    decoder.layers = torch.nn.ModuleList([decoder.layers[i] for i in keep])
    for new, layer in enumerate(decoder.layers):  # the KV cache is indexed by layer_idx
        if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            layer.self_attn.layer_idx = new
    reference.config.get_text_config().num_hidden_layers = len(keep)
    for key in ("layer_types",):
        values = getattr(reference.config.get_text_config(), key, None)
        if isinstance(values, list) and len(values) > len(keep):
            setattr(reference.config.get_text_config(), key, [values[i] for i in keep])
    model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32, use_safetensors=True)
    with torch.no_grad():
        expected = reference(ids, use_cache=False).logits[0]
        logits = model(ids, use_cache=False).logits[0]
    max_diff = float((logits - expected).abs().max())
    check = {
        "prompt": VERIFY_PROMPT,
        "max_abs_logit_diff": max_diff,
        "tolerance": LOGIT_TOLERANCE,
        "layers_loaded": len(model.get_decoder().layers),
        "next_token": tokenizer.decode([int(logits[-1].argmax())]),
    }
    if max_diff > LOGIT_TOLERANCE or check["layers_loaded"] != len(keep) or not torch.isfinite(logits).all():
        raise ModelError(f"pruned copy does not match the source with those layers removed: {check}")
    return check
