"""Bundled models: name resolution, and conversion verified against transformers' GGUF loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.errors import ModelError
from distill.models import BUNDLED, LOGIT_TOLERANCE, prepare, prepared_dir, resolve_model, verify
from tests.conftest import run_distill


def test_resolve_local_dirs_hub_ids_and_unknown_names(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model(str(tmp_path.parent))
    with pytest.raises(ModelError, match=r"unknown model 'smollm'; use a bundled alias \(smollm2-135m-instruct"):
        resolve_model("smollm")
    with pytest.raises(ModelError, match="not a directory"):
        resolve_model(str(tmp_path / "config.json"))


@pytest.mark.slow
@pytest.mark.parametrize("alias", list(BUNDLED))
def test_conversion_matches_direct_gguf_load(alias: str) -> None:
    directory = prepare(alias)
    check = verify(alias, directory)  # loads the GGUF afresh with transformers and compares
    assert check["max_abs_logit_diff"] <= LOGIT_TOLERANCE
    assert check["same_argmax"]
    assert list(directory.glob("*.safetensors")) and not list(directory.glob("*.bin"))
    if BUNDLED[alias].needs_bos:
        assert check["token_ids"][0] == 2  # Gemma's <bos>: without it the model degenerates


@pytest.mark.slow
@pytest.mark.parametrize("alias", list(BUNDLED))
def test_converted_model_answers_sensibly_with_its_chat_template(alias: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = prepared_dir(alias)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0][inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_models_cli_lists_aliases_and_rejects_unknown() -> None:
    listing = run_distill("models", "list")
    assert listing.returncode == 0
    for alias in BUNDLED:
        assert alias in listing.stdout
    bad = run_distill("models", "prepare", "gpt-5")
    assert bad.returncode == 1
    assert "error: unknown bundled model 'gpt-5'; known: smollm2-135m-instruct, gemma-3-270m" in bad.stderr
