"""`python -m rao_megatron.cli.generate` on the HF backend: output format, resume, determinism, bad rows, annotate."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from rao_megatron import generate, generation
from rao_megatron.cli.common import run_cli
from rao_megatron.data.tokenizer import load_tokenizer

PROMPTS = [
    {"prompt": "What is 2 + 3?", "answer": 5, "source": "hand"},
    {"id": "q1", "prompt": "Name a colour.", "answer": "#### 7"},
    {"id": 7, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 12"},
                           {"role": "assistant", "content": "Hello 12"}], "answer": 12},
    {"prompt": [{"role": "user", "content": "Count to 3."}], "answer": 3},
    {"prompt": "Say 4.", "answer": 4},
]


def write_jsonl(rows: list, path: Path) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def gen_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(generate.main, generate.parser(), [*argv, "--no-progress", "--threads", "1"])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama with the tiny ChatML tokenizer, saved as an HF directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = load_tokenizer(None)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    d = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    return write_jsonl(PROMPTS, tmp_path_factory.mktemp("prompts") / "prompts.jsonl")


@pytest.fixture(scope="module")
def sampled(tiny_model, prompts_file, tmp_path_factory) -> Path:
    """K=3 samples of every prompt, uninterrupted, 2 prompts per batch."""
    out = tmp_path_factory.mktemp("gen") / "samples.jsonl"
    code, _, err = gen_cli("--model", str(tiny_model), "--prompts", str(prompts_file), "--out", str(out), "--n", "3",
                           "--max-new-tokens", "12", "--batch-size", "2", "--seed", "3")
    assert code == 0, err
    return out


def test_output_rows_hold_k_samples_sampling_and_passthrough_fields(sampled, tiny_model):
    rows = read_jsonl(sampled)
    assert [r["id"] for r in rows] == [0, "q1", 7, 3, 4]
    sampling = {"n": 3, "temperature": 0.7, "top_p": 0.95, "max_new_tokens": 12, "seed": 3, "backend": "hf",
                "model": str(tiny_model)}
    for r, src in zip(rows, PROMPTS):
        assert len(r["responses"]) == 3 and all(isinstance(y, str) for y in r["responses"])
        assert r["sampling"] == sampling
        assert r["answer"] == src["answer"]
        assert list(r)[:4] == ["id", "prompt" if "prompt" in src else "messages", "responses", "sampling"]
    assert rows[0]["source"] == "hand" and rows[0]["prompt"] == "What is 2 + 3?"
    assert rows[3]["prompt"] == PROMPTS[3]["prompt"]  # a message-list prompt is kept as given
    # a final assistant turn leaves the prompt and becomes the reference
    assert rows[2]["messages"] == PROMPTS[2]["messages"][:2] and rows[2]["reference"] == "Hello 12"
    assert "reference" not in rows[0]
    assert len({y for r in rows for y in r["responses"]}) > 5  # sampled, not copies


def test_annotate_scores_the_output_directly(sampled, tmp_path):
    from rao_megatron import annotate

    scored = tmp_path / "scored.jsonl"
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = run_cli(annotate.main, annotate.parser(),
                       ["--data", str(sampled), "--out", str(scored), "--reward-fn",
                        "rao_megatron.rewards.rule:exact_final_number", "--no-progress"])
    assert code == 0, err.getvalue()
    rows, before = read_jsonl(scored), read_jsonl(sampled)
    assert not (tmp_path / "scored.jsonl.rejected.jsonl").exists()
    assert [r["id"] for r in rows] == [r["id"] for r in before]
    for r, b in zip(rows, before):
        assert r["responses"] == b["responses"] and r["sampling"] == b["sampling"] and r["answer"] == b["answer"]
        assert len(r["rewards"]) == 3 and set(r["rewards"]) <= {0.0, 1.0}
    assert rows[2]["reference_reward"] == 1.0  # "Hello 12" holds the gold answer 12


def test_resumed_run_writes_what_an_uninterrupted_run_writes(sampled, tiny_model, prompts_file, tmp_path):
    out = tmp_path / "resumed.jsonl"
    common = ["--model", str(tiny_model), "--prompts", str(prompts_file), "--out", str(out), "--n", "3",
              "--max-new-tokens", "12", "--seed", "3"]
    assert gen_cli(*common, "--limit", "3", "--batch-size", "2")[0] == 0
    with out.open("a") as f:
        f.write('{"id": 3, "prompt": "Count')  # a crash in the middle of a write
    code, stdout, err = gen_cli(*common, "--batch-size", "3")  # other batches: samples must not depend on them
    assert code == 0, err
    assert "3 of 5 prompts already there" in stdout and "half-written" in stdout
    assert out.read_text() == sampled.read_text()
    # a finished output is left alone; other settings are refused rather than mixed in
    assert gen_cli(*common)[0] == 0 and out.read_text() == sampled.read_text()
    code, _, err = gen_cli(*common[:-1], "4")
    assert code == 2 and "other settings" in err and "--restart" in err


def test_greedy_is_deterministic_and_gives_k_copies(tiny_model, prompts_file, tmp_path):
    outs = []
    for seed, batch in ((0, "5"), (1, "2")):
        out = tmp_path / f"greedy{seed}.jsonl"
        assert gen_cli("--model", str(tiny_model), "--prompts", str(prompts_file), "--out", str(out), "--n", "2",
                       "--temperature", "0", "--max-new-tokens", "10", "--seed", str(seed), "--batch-size", batch)[0] == 0
        outs.append(read_jsonl(out))
    assert [r["responses"] for r in outs[0]] == [r["responses"] for r in outs[1]]
    assert all(len(r["responses"]) == 2 and r["responses"][0] == r["responses"][1] for r in outs[0])


def test_python_api_takes_a_loaded_model_and_matches_the_cli(sampled, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model)).train()
    rows = generation.generate_rows(str(tiny_model), PROMPTS, n=3, max_new_tokens=12, seed=3, batch_size=5,
                                    progress=False, model=model, tokenizer=load_tokenizer(tiny_model))
    assert rows == read_jsonl(sampled)
    assert model.training  # the caller's model is left in the mode it came in
    other = generation.generate_rows(str(tiny_model), PROMPTS[:2], n=3, max_new_tokens=12, seed=4, progress=False,
                                     model=model, tokenizer=load_tokenizer(tiny_model))
    assert [r["responses"] for r in other] != [r["responses"] for r in rows[:2]]  # the seed matters
    with pytest.raises(ValueError, match="backend='hf'"):
        generation.generate_rows(None, PROMPTS, backend="vllm", model=model)


def test_auto_backend_is_hf_without_cuda_or_vllm():
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("vllm"):
        assert generation.resolve_backend("auto") == "vllm"
    else:
        assert generation.resolve_backend("auto") == "hf"
    assert generation.resolve_backend("auto", have_model=True) == "hf"


@pytest.mark.parametrize("row, where, message", [
    ({"text": "hi"}, "line 2: field 'prompt'", "missing"),
    ({"prompt": "  "}, "line 2: field 'prompt'", "empty string"),
    ({"prompt": "hi", "id": 1.5}, "line 2: field 'id'", "string or an integer"),
    ({"messages": [{"role": "user"}]}, "line 2: field 'messages[0]'", "{role: str, content: str}"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "line 2: field 'messages'", "only an assistant turn"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "line 2: field 'prompt'", "must end before the assistant turn"),
    ({"prompt": "again", "id": 0}, "row 1 (0-based): field 'id'", "duplicate id 0"),
    ("{not json", "line 2", "invalid JSON"),
    ([1, 2], "line 2", "expected a JSON object"),
])
def test_bad_rows_name_file_row_and_field(tiny_model, tmp_path, row, where, message):
    bad = write_jsonl([{"prompt": "fine"}, row], tmp_path / "bad.jsonl")
    code, _, err = gen_cli("--model", str(tiny_model), "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl"))
    assert code == 2
    assert err.startswith(f"error: {bad}: {where}") and message in err, err
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_arguments_are_one_line_errors(tiny_model, prompts_file, tmp_path):
    for extra, message in ((["--n", "0"], "--n"), (["--top-p", "0"], "--top-p"), (["--temperature", "-1"], "--temperature")):
        code, _, err = gen_cli("--model", str(tiny_model), "--prompts", str(prompts_file), "--out",
                               str(tmp_path / "o.jsonl"), *extra)
        assert code == 2 and message in err, err
    code, _, err = gen_cli("--model", str(tiny_model), "--prompts", str(prompts_file), "--out", str(tmp_path / "o.parquet"))
    assert code == 2 and ".jsonl" in err


def test_seeds_depend_on_prompt_id_and_sample_only():
    s = generation.prompt_seed
    assert s(0, 1, 0) == s(0, 1, 0) and s(0, 1, 0) != s(0, "1", 0) != s(0, 1, 1) != s(1, 1, 0)
    assert 0 <= s(5, "x") < 2**63


def test_smollm2_greedy_answers_2_plus_3(smollm2_hf_dir):
    rows = generation.generate_rows(smollm2_hf_dir, [{"prompt": "What is 2 + 3? Answer with just the number."}],
                                    n=1, temperature=0.0, max_new_tokens=8, progress=False)
    assert "5" in rows[0]["responses"][0], rows
    assert "<|im_end|>" not in rows[0]["responses"][0]


def test_parquet_input_gives_the_same_rows_as_jsonl(tiny_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "a", "prompt": "Say 1.", "answer": 1}, {"id": "b", "prompt": "Say 2.", "answer": 2}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    outs = []
    for src in (tmp_path / "p.parquet", write_jsonl(rows, tmp_path / "p.jsonl")):
        out = tmp_path / f"{src.suffix[1:]}.jsonl"
        code, _, err = gen_cli("--model", str(tiny_model), "--prompts", str(src), "--out", str(out), "--n", "2",
                               "--max-new-tokens", "6")
        assert code == 0, err
        outs.append(read_jsonl(out))
    assert outs[0] == outs[1] and [r["id"] for r in outs[0]] == ["a", "b"]
