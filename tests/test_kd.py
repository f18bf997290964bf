"""`distill train kd` and what it needs: the teacher's top-K logprobs captured on kept rows (store
format, equality with the teacher's own scores within fp16, SIGKILL resume), the K+1-bucket KL,
offline KD vs cross-entropy alone on a depth-pruned SmolLM2 student, on-policy KD with TRL, the
tokenizer check before any model loads, and `distill models prune` (transformers vs vLLM)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from distill.config import load_config
from tests.conftest import REPO, SERVED_NAME, TEACHER_MODEL, openai_generate_args, read_jsonl, run_distill

FP16_RELATIVE = 2**-11  # fp16 keeps 11 significant bits: storing a value moves it by at most this share


# The loss (no model) ---------------------------------------------------------------------------


def test_bucket_kl_is_the_full_kl_when_the_tail_is_one_token() -> None:
    """With K = V − 1 the tail bucket is exactly one token, so the K+1-bucket KL must equal the
    full-vocabulary KL, computed here independently (torch.distributions)."""
    import torch
    from torch.distributions import Categorical, kl_divergence

    from distill.kd import bucket_kl, student_buckets, teacher_buckets

    torch.manual_seed(0)
    teacher_logits, student_logits = torch.randn(5, 7) * 2, torch.randn(5, 7) * 2
    top_logprobs, top_ids = teacher_logits.log_softmax(-1).topk(6, dim=-1)
    expected = kl_divergence(Categorical(logits=teacher_logits), Categorical(logits=student_logits))
    buckets = student_buckets(student_logits, top_ids)
    assert torch.allclose(buckets.exp().sum(-1), torch.ones(5), atol=1e-6)  # the student's buckets are exact
    got = bucket_kl(teacher_buckets(top_logprobs), buckets)
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    # At a temperature both distributions are softened over the same buckets; identical models: KL 0.
    same = bucket_kl(teacher_buckets(top_logprobs), student_buckets(teacher_logits, top_ids), temperature=2.0)
    assert torch.allclose(same, torch.zeros(5), atol=1e-5)


def test_store_round_trip_and_compaction(tmp_path: Path) -> None:
    import numpy as np

    from distill.kd_capture import LogprobStore, RowLogprobs

    rng = np.random.default_rng(0)

    def row(length: int, sha: str) -> RowLogprobs:
        logprobs = -rng.exponential(3, size=(length, 20)).astype(np.float32)
        return RowLogprobs(
            token_ids=rng.integers(0, 49152, length),
            token_logprobs=logprobs[:, 0],
            top_ids=rng.integers(0, 49152, (length, 20)),
            top_logprobs=np.sort(logprobs, axis=1)[:, ::-1],
            answer_start=7,
            ids_sha=sha,
        )

    store = LogprobStore(tmp_path / "logprobs")
    written = {"a": row(30, "1"), "b": row(12, "2")}
    store.write(list(written.items()), k=20)
    store.write([("c", row(5, "3"))], k=20)  # a batch whose rows are later dropped
    store.write([("a", row(30, "4"))], k=20)  # a row scored again (another rendering): the last one counts
    reread = LogprobStore(tmp_path / "logprobs")  # a new process reading the files
    got = reread.get("b")
    assert got is not None and got.answer_start == 7 and got.ids_sha == "2"
    assert np.array_equal(got.top_ids, written["b"].top_ids) and np.array_equal(got.token_ids, written["b"].token_ids)
    error = np.abs(got.top_logprobs.astype(np.float32) - written["b"].top_logprobs)
    assert (error <= FP16_RELATIVE * np.abs(written["b"].top_logprobs) + 1e-7).all()
    assert reread.get("a").ids_sha == "4"
    reread.compact(["a", "b"])
    lines = read_jsonl(tmp_path / "logprobs" / "index.jsonl")
    assert [line["id"] for line in lines] == ["a", "b"]  # one line per kept row
    assert len(list((tmp_path / "logprobs").glob("shard-*"))) == 2  # c's shard and a's old one are gone
    # Shards still in use are kept whole (a's first copy shares b's shard): 42 + 30 tokens at
    # 2 + 2 + 4·20 bytes per token (uint16 ids, fp16 logprobs), plus a safetensors header each.
    assert 84 * 72 < reread.nbytes() < 84 * 72 + 2 * 1024


def tiny_tokenizer(directory: Path, words: list[str]) -> Path:
    """A word-level tokenizer directory that resolve_model accepts (no weights at all)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<unk>", "<eos>", *words])}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>", eos_token="<eos>").save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": len(vocab)}))
    return directory


@pytest.mark.parametrize("mode", ["offline", "on-policy"])
def test_a_tokenizer_mismatch_is_one_error_line_before_any_model_loads(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers
    from click.testing import CliRunner

    from distill.cli import cli
    from distill.kd_capture import load_tokenizer, tokenizer_identity

    student = tiny_tokenizer(tmp_path / "student", ["the", "capital", "is", "paris"])
    teacher = tiny_tokenizer(tmp_path / "teacher", ["the", "capital", "is", "rome", "and"])
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"r{i}", "instruction": "the capital", "output": "paris"}) + "\n" for i in range(4))
    )
    logprobs = tmp_path / "logprobs"
    logprobs.mkdir()
    capture = {"k": 20, "tokenizer": tokenizer_identity(load_tokenizer(str(teacher))), "source": {"model": "teacher"}}
    (logprobs / "capture.json").write_text(json.dumps(capture))

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the tokenizer check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    args = ["train", "kd", "--mode", mode, "--run-dir", str(tmp_path / "run"), "--student", str(student)]
    args += ["--set", f"train.sft.data={data}", "--set", f"train.kd.logprobs={logprobs}"]
    args += ["--set", f"train.kd.teacher={teacher}", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tokenizer mismatch: student"), lines
    assert "6 tokens" in lines[0] and "7 tokens" in lines[0] and "GOLD" in lines[0]
    assert not (tmp_path / "run" / "kd").exists()  # nothing written either


# Pruning ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pruned_student(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct cut to 10 of its 30 layers: the same-tokenizer student of these tests."""
    from distill.prune import prune_model

    out = tmp_path_factory.mktemp("pruned") / "smollm2-10l"
    prune_model(TEACHER_MODEL, 10, out)
    return out


@pytest.mark.slow
def test_a_pruned_model_gives_the_same_logprobs_in_transformers_and_vllm(pruned_student: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from distill.config import TeacherConfig
    from distill.records import ChatRequest, Message
    from distill.teacher import load_teacher

    config = json.loads((pruned_student / "config.json").read_text())
    record = json.loads((pruned_student / "distill-prune.json").read_text())
    assert config["num_hidden_layers"] == 10 and record["kept_layers"] == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert record["verification"]["max_abs_logit_diff"] <= 1e-3  # vs the source with those layers removed
    model = AutoModelForCausalLM.from_pretrained(pruned_student, dtype=torch.float32)
    assert len(model.model.layers) == 10
    assert not list(pruned_student.glob("*.bin")), "safetensors only"

    # vLLM returns log-probabilities, not logits: compare those (log_softmax of the same logits) on
    # every position of a fixed conversation, the top-20 alternatives included.
    request = ChatRequest(
        messages=[Message(role="user", content="Name a large city."), Message(role="assistant", content="Paris.")],
        max_tokens=1,
        prompt_logprobs=20,
    )
    engine = load_teacher(
        TeacherConfig(
            backend="vllm",
            model=str(pruned_student),
            options={"enforce_eager": True, "max_model_len": 512, "cpu_kv_cache_gib": 1},
        )
    )
    try:
        [scored] = engine.generate([request])
    finally:
        engine.close()
    assert scored.ok, scored.error
    ids = scored.prompt_token_ids
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    worst, compared = 0.0, 0
    for position, entry in enumerate(scored.prompt_logprobs[1:], 1):
        assert entry.id == ids[position]
        for token_id, value in {ids[position]: entry.logprob, **entry.top_ids}.items():
            worst = max(worst, abs(value - float(expected[position - 1, token_id])))
            compared += 1
    print(f"\npruned SmolLM2 (10 layers): max |Δ logprob| transformers vs vLLM {worst:.2e} over {compared} values")
    assert compared > 20 * (len(ids) - 1) and worst <= 1e-3


# Capture ---------------------------------------------------------------------------------------

QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What is the capital of Italy?",
    "What is the capital of Spain?",
    "What is the capital of Germany?",
    "What is the capital of Canada?",
    "What is the capital of Egypt?",
    "What is the capital of Kenya?",
    "Name a primary colour.",
    "Name a planet of the solar system.",
    "What colour is the sky on a clear day?",
    "How many legs does a spider have?",
    "What is 2 + 2?",
    "Name a fruit that is yellow.",
    "What is the opposite of hot?",
    "Name an ocean.",
    "Which continent is Brazil in?",
    "What language is spoken in Mexico?",
    "What do bees make?",
    "What is frozen water called?",
    "Name a musical instrument with strings.",
    "How many days are in a week?",
    "What gas do plants take in?",
    "Name a mammal that lives in the sea.",
]


@pytest.fixture(scope="session")
def kd_data(vllm_teacher: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """24 questions answered by the teacher (the in-process engine): sampled at temperature 1 (as
    generate samples; seeded) with their captured top-20 logprobs, and greedily."""
    from distill.kd_capture import LogprobCapture, load_tokenizer
    from distill.records import ChatRequest, Message

    root = tmp_path_factory.mktemp("kd-data")
    found = {}
    for name, temperature in (("sampled", 1.0), ("greedy", 0.0)):
        requests = [
            ChatRequest(messages=[Message(role="user", content=q)], max_tokens=24, temperature=temperature, seed=i)
            for i, q in enumerate(QUESTIONS)
        ]
        rows = [
            {"id": f"q{i}", "instruction": q, "output": a.text.strip()}
            for i, (q, a) in enumerate(zip(QUESTIONS, vllm_teacher.generate(requests)))
            if a.ok and a.text.strip()
        ]
        found[name] = root / f"{name}.jsonl"
        found[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    rows = read_jsonl(found["sampled"])
    capture = LogprobCapture(
        root / "logprobs",
        20,
        load_tokenizer(TEACHER_MODEL),
        lambda: vllm_teacher,
        {"backend": "vllm", "model": TEACHER_MODEL},
    )
    capture.capture(rows)
    return {**found, "logprobs": root / "logprobs", "summary": capture.finish(rows)}


@pytest.mark.slow
def test_captured_logprobs_equal_the_teachers_own_within_fp16(kd_data: dict[str, Any], vllm_teacher: Any) -> None:
    import numpy as np

    from distill.kd_capture import LogprobStore, load_tokenizer, rendered_row
    from distill.records import ChatRequest, Message

    directory, summary = kd_data["logprobs"], kd_data["summary"]
    rows = read_jsonl(kd_data["sampled"])
    assert summary["rows"] == summary["kept_rows"] == len(rows) >= 20 and summary["missing_rows"] == 0
    assert summary["failed"] == {} and summary["k"] == 20
    assert summary["tokenizer"]["vocab_size"] == 49152
    print(
        f"\ncapture: {summary['tokens']} tokens, {summary['bytes_per_token']} bytes/token "
        f"({summary['bytes_per_token_with_index']} with the index), ids {summary['id_dtype']}"
    )
    assert summary["bytes_per_token"] <= 150
    store, tokenizer = LogprobStore(directory), load_tokenizer(TEACHER_MODEL)
    for row in rows[:4]:
        pair = {
            "prompt": [{"role": "user", "content": row["instruction"]}],
            "completion": [{"role": "assistant", "content": row["output"]}],
        }
        ids, start = rendered_row(tokenizer, pair)
        messages = [Message(role="user", content=row["instruction"]), Message(role="assistant", content=row["output"])]
        [exact] = vllm_teacher.generate([ChatRequest(messages=messages, max_tokens=1, prompt_logprobs=20)])
        stored = store.get(row["id"])
        assert exact.prompt_token_ids == ids and stored.answer_start == start
        assert stored.token_ids.tolist() == ids[start:]  # every answer token, the closing <|im_end|> included
        for position, entry in enumerate(exact.prompt_logprobs[start:]):
            assert set(stored.top_ids[position].tolist()) == set(entry.top_ids)
            for token_id, value in zip(stored.top_ids[position].tolist(), stored.top_logprobs[position].tolist()):
                reference = entry.top_ids[token_id]
                assert abs(value - reference) <= FP16_RELATIVE * abs(reference) + 1e-4, (value, reference)
            assert (
                abs(float(stored.token_logprobs[position]) - entry.logprob) <= FP16_RELATIVE * abs(entry.logprob) + 1e-4
            )
            assert np.isfinite(stored.top_logprobs[position]).all()


@pytest.mark.slow
def test_capture_in_generate_survives_sigkill_without_duplicates(vllm_server: str, tmp_path: Path) -> None:
    """`distill generate` (openai teacher → the vLLM server, which scores with prompt_logprobs)
    killed once rows are being captured; the rerun ends with exactly one capture per kept row."""
    run_dir, target = tmp_path / "run", 6
    args = openai_generate_args(vllm_server, run_dir, target, "--set", "generate.batch_size=2")
    args += ["--set", "generate.capture_logprobs=20", "--set", f"generate.capture_tokenizer={TEACHER_MODEL}"]
    index = run_dir / "logprobs" / "index.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "distill.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600
    while not (index.exists() and index.read_text().count("\n") >= 1) and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed = process.poll() is None
    if killed:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    captured_before = {line["id"] for line in read_jsonl(index)}
    result = run_distill(*args)
    assert result.returncode == 0, result.stderr
    kept = [row["id"] for row in read_jsonl(run_dir / "instructions.jsonl")]
    lines = read_jsonl(index)
    assert len(kept) == target and [line["id"] for line in lines] == kept  # one line per kept row, in order
    summary = json.loads((run_dir / "manifest.json").read_text())["summary"]["logprobs"]
    assert summary["rows"] == target and summary["missing_rows"] == 0 and summary["failed"] == {}
    assert summary["source"] == {"backend": "openai", "model": SERVED_NAME, "tokenizer": TEACHER_MODEL}
    # Rows captured before the kill were not scored again.
    assert summary["scored_this_run"] == target - len(captured_before & set(kept))
    from distill.kd_capture import LogprobStore

    store = LogprobStore(run_dir / "logprobs")
    assert all(len(store.get(row_id).token_ids) == line["length"] > 0 for row_id, line in zip(kept, lines))
    shards = {p.name.split(".")[0] for p in (run_dir / "logprobs").glob("shard-*")}
    assert shards == {line["shard"] for line in lines}  # no orphan from the killed batch
    print(f"\ncapture killed: {killed}, rows captured before the kill: {len(captured_before)} of {target}")


# Training --------------------------------------------------------------------------------------


def kd_config(data: Path, logprobs: Path, student: Path, run_dir: Path, **extra: Any) -> Any:
    settings = {
        "run_dir": run_dir,
        "train.student": student,
        "train.sft.data": data,
        "train.kd.logprobs": logprobs,
        "train.kd.max_steps": 12,
        "train.kd.batch_size": 6,
        "train.kd.learning_rate": 2e-3,
        "train.kd.warmup_ratio": 0,
        "train.kd.eval_fraction": 0.25,
        "train.kd.max_length": 96,
        "train.lora.dropout": 0,
        "train.report_to": "[]",
        **extra,
    }
    return load_config(None, [f"{key}={value}" for key, value in settings.items()])


@pytest.mark.slow
def test_offline_kd_closes_the_kl_to_the_teacher_faster_than_cross_entropy(
    kd_data: dict[str, Any], pruned_student: Path, tmp_path: Path
) -> None:
    from distill.kd import run_kd

    data, logprobs = kd_data["sampled"], kd_data["logprobs"]
    kd = run_kd(kd_config(data, logprobs, pruned_student, tmp_path / "kd", **{"train.kd.alpha": 1.0}), progress=False)
    ce = run_kd(kd_config(data, logprobs, pruned_student, tmp_path / "ce", **{"train.kd.alpha": 0.0}), progress=False)
    assert kd["rows"] == ce["rows"] and kd["rows"]["eval"] >= 5 and kd["left_out"] == {"train": {}, "eval": {}}
    # Same base, same held-out rows: the same starting KL (LoRA starts as a no-op).
    assert kd["heldout"]["before"] == ce["heldout"]["before"]
    start = kd["heldout"]["before"]["kl"]
    kd_drop, ce_drop = start - kd["heldout"]["after"]["kl"], start - ce["heldout"]["after"]["kl"]
    print(
        f"\nheld-out KL to the teacher's top-20 ({kd['heldout']['before']['tokens']} tokens): {start:.3f} before; "
        f"after 12 steps KD {kd['heldout']['after']['kl']:.3f}, CE only {ce['heldout']['after']['kl']:.3f}"
    )
    assert kd_drop > 0 and kd_drop > ce_drop
    assert kd["heldout"]["kd_minus_base_interval"][1] < 0  # the paired interval over held-out rows excludes 0
    # The loss scales are logged every step, and the summary says how much of the loss was KL.
    steps = [row for row in read_jsonl(tmp_path / "kd" / "kd" / "metrics.jsonl") if "loss" in row]
    assert len(steps) == 12 and all(
        {"kd/kl", "kd/ce", "kd/kl_term", "kd/ce_term", "kd/kl_share"} <= set(r) for r in steps
    )
    assert all(math.isclose(r["loss"], r["kd/kl_term"] + r["kd/ce_term"], rel_tol=1e-4) for r in steps)
    assert kd["loss_scales"]["kl_share"] == 1.0 and ce["loss_scales"]["kl_share"] == 0.0 and not kd["warnings"]
    out = tmp_path / "kd" / "kd"
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "manifest.json", "split.json"):
        assert (out / name).is_file(), name


@pytest.mark.slow
def test_on_policy_kd_raises_the_students_logprob_of_the_teachers_answers(
    kd_data: dict[str, Any], pruned_student: Path, tmp_path: Path
) -> None:
    from distill.kd import run_kd

    # Prompts from the greedy rows' training split; held out: the teacher's greedy answers to the rest.
    config = kd_config(
        kd_data["greedy"],
        kd_data["logprobs"],
        pruned_student,
        tmp_path / "run",
        **{
            "train.kd.mode": "on-policy",
            "train.kd.max_steps": 3,
            "train.kd.batch_size": 2,
            "train.kd.max_new_tokens": 12,
            "teacher.model": TEACHER_MODEL,
        },
    )
    summary = run_kd(config, progress=False)
    before, after = summary["heldout_answer_logprob"]["before"], summary["heldout_answer_logprob"]["after"]
    print(f"\non-policy KD, 3 TRL steps: mean logprob of the teacher's held-out answers {before:.3f} → {after:.3f}")
    assert summary["trainer"] == "DistillationTrainer" and summary["steps"] == 3
    assert after > before
    steps = [row for row in read_jsonl(tmp_path / "run" / "kd" / "metrics.jsonl") if "loss" in row]
    assert len(steps) == 3 and all(math.isfinite(row["loss"]) for row in steps)


def test_distill_run_trains_the_students_train_method_names(tmp_path: Path) -> None:
    from distill.errors import ConfigError
    from distill.pipeline import run_pipeline

    student = tiny_tokenizer(tmp_path / "student", ["the", "capital", "is", "paris"])
    base = [f"run_dir={tmp_path / 'run'}", f"train.student={student}"]
    lines: list[str] = []
    assert run_pipeline(load_config(None, base), ("kd",), echo=lines.append) == {}  # train.method: sft
    assert lines == ["[kd] not trained with train.method=sft, skipped"]
    assert not (tmp_path / "run" / "stages").exists()
    # KD asked for: its inputs are checked before any stage runs (generate included).
    with pytest.raises(ConfigError, match=r"generate\.capture_logprobs: offline KD needs"):
        run_pipeline(load_config(None, [*base, "train.method=sft+kd"]), ("generate", "kd"), echo=lines.append)
    with pytest.raises(ConfigError, match="no captured logprobs"):
        run_pipeline(load_config(None, [*base, "train.method=kd"]), ("kd",), echo=lines.append)
    assert not (tmp_path / "run" / "instructions.jsonl").exists()
