"""The vLLM backend of `python -m rao_megatron.cli.generate` on SmolLM2: output format, seeding, greedy == HF greedy."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rao_megatron import generation
from rao_megatron.data.prompts import parse_prompt_row

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (pip install -e .[gen])"),
]

ROWS = [{"prompt": "What is 2 + 3? Answer with just the number.", "answer": 5},
        {"id": "fr", "messages": [{"role": "user", "content": "What is the capital of France?"},
                                  {"role": "assistant", "content": "Paris."}]}]


@pytest.fixture(scope="module")
def engine(smollm2_hf_dir):
    return generation.VLLMBackend(smollm2_hf_dir, seed=0, dtype="float32", gpu_memory_utilization=0.3)


def run(engine, smollm2_hf_dir, **kw):
    prompts = [parse_prompt_row(r, index=i, source="<rows>", where=f"row {i}") for i, r in enumerate(ROWS)]
    cfg = generation.SamplingConfig(**kw)
    return [r for b in generation.iter_generated(engine, prompts, cfg, model_name=str(smollm2_hf_dir), progress=False)
            for r in b]


def test_vllm_rows_have_the_shared_format_and_are_seeded(engine, smollm2_hf_dir):
    rows = run(engine, smollm2_hf_dir, n=3, max_new_tokens=16, temperature=0.8, seed=1)
    assert [r["id"] for r in rows] == [0, "fr"]
    assert all(len(r["responses"]) == 3 and all(isinstance(y, str) for y in r["responses"]) for r in rows)
    assert rows[0]["sampling"] == {"n": 3, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 16, "seed": 1,
                                   "backend": "vllm", "model": str(smollm2_hf_dir)}
    assert rows[0]["answer"] == 5 and rows[1]["reference"] == "Paris." and len(rows[1]["messages"]) == 1
    assert not any("<|im_end|>" in y for r in rows for y in r["responses"])
    again = run(engine, smollm2_hf_dir, n=3, max_new_tokens=16, temperature=0.8, seed=1)
    assert [r["responses"] for r in again] == [r["responses"] for r in rows]  # seeded per prompt id


def test_vllm_greedy_matches_hf_greedy_on_the_first_tokens(engine, smollm2_hf_dir):
    vllm_rows = run(engine, smollm2_hf_dir, n=2, max_new_tokens=8, temperature=0.0)
    hf_rows = generation.generate_rows(smollm2_hf_dir, ROWS, n=1, max_new_tokens=8, temperature=0.0,
                                       progress=False, dtype="float32")
    tok = engine.tokenizer
    for v, h in zip(vllm_rows, hf_rows):
        assert v["responses"][0] == v["responses"][1]
        first = [tok(r["responses"][0], add_special_tokens=False)["input_ids"][:4] for r in (v, h)]
        assert first[0] == first[1], (v["responses"], h["responses"])
    assert "5" in vllm_rows[0]["responses"][0]
