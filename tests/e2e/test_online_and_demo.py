"""The quick-start's task and stage runner, and online GRAO rounds through the real commands on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rao_megatron import demo
from rao_megatron.cli.chain import CommandError, command_env
from rao_megatron.rewards.rule import exact_final_number
from rao_megatron.tasks.arithmetic import all_problems, split

ROOT = Path(__file__).resolve().parents[2]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_arithmetic_task_is_right_and_split_disjoint():
    rows = all_problems()
    assert len(rows) == 81 + 64 and len({r["id"] for r in rows}) == len(rows)
    by_id = {r["id"]: r for r in rows}
    assert by_id["add-3-5"]["prompt"] == "What is 3 + 5? Answer with just the number." and by_id["add-3-5"]["answer"] == 8
    assert by_id["mul-7-8"]["answer"] == 56 and "7 times 8" in by_id["mul-7-8"]["prompt"]
    for r in rows:  # the reference answer earns the full rule reward; a wrong number earns none
        assert exact_final_number(r["prompt"], r["reference"], r) == 1.0
        assert exact_final_number(r["prompt"], f"{r['answer'] + 1}", r) == 0.0
    train, heldout = split(40, seed=0)
    assert len(heldout) == 40 and len(train) == len(rows) - 40
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    assert split(40, seed=0) == (train, heldout) and split(40, seed=1)[1] != heldout
    with pytest.raises(ValueError, match="n_heldout"):
        split(0)


@pytest.fixture
def fake_stages(monkeypatch):
    """Stages that record their runs; the one named in ``fail`` raises once."""
    calls: list[str] = []
    fail: set[str] = set()

    def make(name):
        def run(s):
            calls.append(name)
            if name in fail:
                fail.discard(name)
                raise CommandError(f"{name} broke")
        return run

    stages = [demo.Stage(n, n, make(n)) for n in ("a", "b", "c", "d")] + [demo.Stage("e", "e", make("e"), optional=True)]
    monkeypatch.setattr(demo, "STAGES", stages)
    return calls, fail


def test_demo_reruns_skip_finished_stages_and_resume_after_a_failure(fake_stages, tmp_path):
    calls, fail = fake_stages
    s = demo.Settings(out=tmp_path / "run", hf=tmp_path / "hf", config=tmp_path / "c.yaml")
    fail.add("c")
    with pytest.raises(CommandError, match="c broke"):
        demo.run_demo(s)
    assert calls == ["a", "b", "c"]
    demo.run_demo(s)  # a and b are done; c is retried, then d
    assert calls == ["a", "b", "c", "c", "d"]
    demo.run_demo(s)
    assert calls == ["a", "b", "c", "c", "d"]
    demo.run_demo(s, start_from="c")
    assert calls[-2:] == ["c", "d"]
    calls.clear()
    demo.run_demo(s, online=True)  # the optional stage runs only when asked for
    assert calls == ["e"]
    calls.clear()
    demo.run_demo(tmp_path_settings := demo.Settings(out=tmp_path / "r2", hf=s.hf, config=s.config), until="b")
    assert calls == ["a", "b"] and not (tmp_path_settings.out / ".stages" / "c.done").exists()
    with pytest.raises(CommandError, match="no such stage"):
        demo.run_demo(s, start_from="nope")


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


GRAO_TINY = """
model: {preset: null, init_checkpoint: unset, dtype: fp32, logprob_impl: chunked}
parallel: {tp: 1, pp: 1}
loss: {name: grao, beta: 0.5, lam: 0.6}
data: {train_path: unset, eval_fraction: 0.0, max_length: 48, overlength: truncate, groups_per_micro_batch: 2}
train: {task: policy, output_dir: unset, steps: 2, global_batch_groups: 4, lr: 1.0e-3, warmup_steps: 0}
checkpoint: {save_at_end: true}
"""


@pytest.mark.distributed
def test_online_grao_rounds_sample_with_the_previous_rounds_policy(tiny_start, tmp_path):
    hf, megatron = tiny_start
    config = tmp_path / "grao.yaml"
    config.write_text(GRAO_TINY)
    letters = "abcdefgh"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Repeat the letter {c}.", "reference": c * 5})
                               + "\n" for i, c in enumerate(letters)))
    out = tmp_path / "online"
    argv = [sys.executable, "-m", "rao_megatron.cli.online", "--config", str(config), "--prompts", str(prompts),
            "--hf", str(hf), "--start", str(megatron), "--out", str(out), "--rounds", "2", "--n", "3",
            "--max-new-tokens", "8", "--reward-fn", "rao_megatron.rewards.rule:letter_share", "--backend", "hf"]
    proc = subprocess.run(argv, env=command_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = read_jsonl(out / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]
    # round 2 samples with round 1's exported policy and trains from round 1's checkpoint
    r2 = read_jsonl(out / "round_2" / "samples.jsonl")
    assert Path(r2[0]["sampling"]["model"]).resolve() == (out / "round_1" / "hf").resolve()
    assert len(r2) == len(letters) and all(len(r["responses"]) == 3 for r in r2)
    groups = read_jsonl(out / "round_2" / "groups.jsonl")
    assert all(g["reference"] == g["prompt"][-2] * 5 and g["reference_reward"] == 1.0 for g in groups)
    assert all(0.0 <= x <= 1.0 for g in groups for x in g["rewards"])
    assert rounds[1]["sample_reward"] == pytest.approx(
        sum(x for g in groups for x in g["rewards"]) / sum(len(g["rewards"]) for g in groups))
    metrics = read_jsonl(out / "round_2" / "train" / "metrics.jsonl")
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert all(m["loss"] == m["loss"] for m in metrics if "loss" in m)
    assert (out / "final_hf").resolve() == (out / "round_2" / "hf").resolve()
    assert (out / "final_hf" / "config.json").is_file()
    # the rounds changed the weights (the update trained the policy it then exported)
    from safetensors.torch import load_file

    w0, w2 = load_file(str(hf / "model.safetensors")), load_file(str(out / "final_hf" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert not w0[name].equal(w2[name])
    # an interrupted run is resumed: re-running does no work and reports the same rounds
    again = subprocess.run(argv, env=command_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "$ " not in again.stdout
    assert read_jsonl(out / "rounds.jsonl") == rounds


def test_online_refuses_prompts_without_a_reference_answer_before_any_work(tmp_path, capsys):
    from rao_megatron import online

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "Repeat the letter a.", "reference": "aaaaa"}) + "\n"
                       + json.dumps({"id": "b", "prompt": "Repeat the letter b."}) + "\n")
    code = online.cli(["--config", "unused.yaml", "--prompts", str(prompts), "--hf", "x", "--start", "y",
                       "--out", str(tmp_path / "out"), "--reward-fn", "rao_megatron.rewards.rule:letter_share"])
    err = capsys.readouterr().err
    assert code == 2 and str(prompts) in err and "field 'reference'" in err and "'b'" in err
    assert not (tmp_path / "out").exists()
