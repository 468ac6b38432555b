"""Online rounds through the real commands on a tiny model: GRAO and a pairwise loss, one run continued across
rounds (optimizer, step and LR schedule carry over), every round's groups trained once, resumable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rao_megatron.cli.chain import command_env
from rao_megatron.cli.online import round_steps, training_groups

ROOT = Path(__file__).resolve().parents[2]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def tiny_start(tmp_path_factory) -> tuple[Path, Path]:
    """A random tiny Llama with the tiny ChatML tokenizer, in HF format and converted to Megatron."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rao_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("start")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d / "hf")
    tok.save_pretrained(d / "hf")
    subprocess.run([sys.executable, "-m", "rao_megatron.cli.convert", "hf-to-megatron", "--hf", str(d / "hf"),
                    "--out", str(d / "megatron"), "--no-progress"], check=True, env=command_env(), cwd=ROOT,
                   capture_output=True)
    return d / "hf", d / "megatron"


TINY = """
model: {{preset: null, init_checkpoint: unset, dtype: fp32, logprob_impl: chunked}}
parallel: {{tp: 1, pp: 1}}
loss: {loss}
data: {{train_path: unset, eval_fraction: 0.0, max_length: 48, overlength: truncate, groups_per_micro_batch: 2}}
train: {{task: policy, output_dir: unset, steps: 1, global_batch_groups: 2, lr: 1.0e-3, warmup_steps: 0}}
checkpoint: {{save_at_end: true}}
online: {{samples: 3, max_new_tokens: 8, temperature: 1.0}}
"""
LETTERS = "abcdef"


def answer_length(prompt: object, response: str) -> float:
    """A reward that differs between a random model's answers (the letter share is 0 for most of them)."""
    return len(response) / 10


def online(tmp_path: Path, start: tuple[Path, Path], loss: str, *extra: str,
           reward: str = "rao_megatron.rewards.rule:letter_share") -> tuple[Path, list[str]]:
    hf, megatron = start
    config = tmp_path / "config.yaml"
    config.write_text(TINY.format(loss=loss))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Repeat the letter {c}.", "reference": c * 5})
                               + "\n" for i, c in enumerate(LETTERS)))
    out = tmp_path / "online"
    argv = [sys.executable, "-m", "rao_megatron.cli.online", "--config", str(config), "--prompts", str(prompts),
            "--hf", str(hf), "--start", str(megatron), "--out", str(out), "--rounds", "3", "--prompts-per-round", "4",
            "--reward-fn", reward, "--backend", "hf", *extra]
    proc = subprocess.run(argv, env=command_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, argv


@pytest.mark.distributed
@pytest.mark.slow
def test_online_grao_continues_one_run_across_rounds(tiny_start, tmp_path):
    out, argv = online(tmp_path, tiny_start, "{name: grao, beta: 0.5, lam: 0.6, advantage_norm: samples}")
    rounds = read_jsonl(out / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2, 3]
    # 4 prompts a round, cycling through the 6: round 2 takes e, f, a, b
    r2 = read_jsonl(out / "round_2" / "samples.jsonl")
    assert [r["prompt"][-2] for r in r2] == ["e", "f", "a", "b"] and all(len(r["responses"]) == 3 for r in r2)
    # round 2 samples with round 1's exported policy
    assert Path(r2[0]["sampling"]["model"]).resolve() == (out / "round_1" / "hf").resolve()
    # every group once a round: 4 groups / global batch 2 = 2 steps; one run, its step counting on
    assert [r["steps"] for r in rounds] == [2, 2, 2]
    metrics = read_jsonl(out / "train" / "metrics.jsonl")
    steps = [m["step"] for m in metrics if m.get("loss") is not None]
    assert steps == [1, 2, 3, 4, 5, 6]
    # one cosine schedule over all rounds (lr 1e-3 down to 0 over 6 steps), not restarted each round
    lrs = [m["lr"] for m in metrics]
    assert lrs[0] == pytest.approx(1e-3) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert "objective/imitation" in metrics[0]  # GRAO's terms, in the record and the plots
    assert (out / "train" / "plots" / "objective.png").is_file()
    for r in rounds:
        assert r["answer_length"] > 0 and 0.0 <= r["sample_reward"] <= 1.0
    groups = read_jsonl(out / "round_3" / "train_groups.jsonl")
    assert all(g["reference"] == g["prompt"][-2] * 5 for g in groups)
    assert (out / "final_hf").resolve() == (out / "round_3" / "hf").resolve()
    # an interrupted run is resumed: re-running does no work and reports the same rounds
    again = subprocess.run(argv, env=command_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "$ " not in again.stdout
    assert read_jsonl(out / "rounds.jsonl") == rounds


@pytest.mark.distributed
@pytest.mark.slow
def test_online_dpo_trains_on_the_samples_only(tiny_start, tmp_path):
    out, _ = online(tmp_path, tiny_start, "{name: dpo, beta: 0.1}", reward="tests.e2e.test_online:answer_length")
    rounds = read_jsonl(out / "rounds.jsonl")
    trained = 0
    for r in range(1, 4):
        rows = read_jsonl(out / f"round_{r}" / "train_groups.jsonl")
        assert all("reference" not in g and len(g["responses"]) == 3 for g in rows)  # no reference answer
        differing = sum(len(set(g["rewards"])) > 1 for g in rows)
        assert rounds[r - 1]["steps"] == -(-differing // 2)  # pairwise: the groups with a pair, once
        trained += rounds[r - 1]["steps"]
    assert trained > 0
    metrics = read_jsonl(out / "train" / "metrics.jsonl")
    assert [m["step"] for m in metrics if m.get("loss") is not None] == list(range(1, trained + 1))


def test_training_groups_and_round_steps():
    rows = [{"prompt": "p", "responses": ["a", "bb"], "rewards": [0.0, 1.0], "reference": "c", "reference_reward": 1.0},
            {"prompt": "q", "responses": ["x", "y"], "rewards": [0.5, 0.5], "reference": "z", "reference_reward": 1.0}]
    assert training_groups(rows, grao=True, reference_answer="given") == rows
    best = training_groups(rows, grao=True, reference_answer="best_sample")
    assert (best[0]["reference"], best[0]["reference_reward"]) == ("bb", 1.0)  # reaches the reference's reward
    assert best[1]["reference"] == "z"  # 0.5 < 1.0: the given one stays
    plain = training_groups(rows, grao=False, reference_answer="given")
    assert all("reference" not in g and "reference_reward" not in g for g in plain)
    assert rows[0]["reference"] == "c"  # the input rows are left as they were
    assert round_steps(rows, 2, pairwise=False) == 1 and round_steps(rows * 3, 2, pairwise=False) == 3
    assert round_steps(rows * 3, 2, pairwise=True) == 2  # the three tied groups hold no pair
    assert round_steps(rows[1:], 2, pairwise=True) == 0  # nothing to train: the round makes no update


def test_online_grao_refuses_prompts_without_a_reference_answer_before_any_work(tmp_path, capsys):
    from rao_megatron.cli import online as online_cli

    config = tmp_path / "grao.yaml"
    config.write_text(TINY.format(loss="{name: grao}"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "Repeat the letter a.", "reference": "aaaaa"}) + "\n"
                       + json.dumps({"id": "b", "prompt": "Repeat the letter b."}) + "\n")
    code = online_cli.cli(["--config", str(config), "--prompts", str(prompts), "--hf", "x", "--start", "y",
                           "--out", str(tmp_path / "out"), "--reward-fn", "rao_megatron.rewards.rule:letter_share"])
    err = capsys.readouterr().err
    assert code == 2 and str(prompts) in err and "field 'reference'" in err and "'b'" in err
    assert not (tmp_path / "out").exists()
