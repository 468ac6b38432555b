"""The training workflow through its CLIs on the tiny config: layouts, reference cache, losses, bad data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rao_megatron.parallel.launch import run_distributed

from .train_workers import run_cli_worker

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "examples/configs/rao_tiny.yaml")
DATA = str(ROOT / "examples/data/tiny_groups.jsonl")


def records(out_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir: Path) -> list[float]:
    return [r["loss"] for r in records(out_dir)]


def assert_same_losses(got: list[float], want: list[float], what: str) -> None:
    """Losses of two runs whose only difference is the summation order (layout, a reference made at TP2).

    Step 1 sees the same weights: fp32 rounding only, magnified by the loss's cancellations (seen <= 1e-6
    relative). Later steps follow Adam updates, whose early steps are ~lr * sign(grad): entries whose
    gradient is rounding noise may step the other way, and that moves later losses by more (seen <= 3e-6)
    and by a CPU-dependent amount; so 1e-3 there. A 20% larger lr moves step 3 by 8e-3, step 4 by 1e-1.
    """
    assert len(got) == len(want), what
    assert got[0] == pytest.approx(want[0], rel=1e-4), what
    assert got[1:] == pytest.approx(want[1:], rel=1e-3), what


def train(tmp_path: Path, name: str, *overrides: str, world: int = 1, data: str = DATA) -> Path:
    out = tmp_path / name
    argv = ["--config", CONFIG, f"train.output_dir={out}", f"data.train_path={data}", *overrides]
    run_distributed(run_cli_worker, world, "rao_megatron.cli.train", argv)
    return out


def test_rao_tiny_same_losses_at_tp1_tp2_pp2(tmp_path):
    steps = ["train.steps=4", "train.reference=on_the_fly", "checkpoint.save_at_end=false"]
    tp1 = records(train(tmp_path, "tp1", *steps))
    assert len(tp1) == 4
    for name, layout in (("tp2", "parallel.tp=2"), ("pp2", "parallel.pp=2")):
        other = records(train(tmp_path, name, *steps, layout, world=2))
        assert_same_losses([r["loss"] for r in other], [r["loss"] for r in tp1], name)
        # the first step's gradient norm comes before any update: a norm of the same entries (seen 3e-8)
        assert other[0]["grad_norm"] == pytest.approx(tp1[0]["grad_norm"], rel=1e-5), name


def test_cached_reference_equals_on_the_fly(tmp_path):
    data = tmp_path / "groups.jsonl"
    data.write_text(Path(DATA).read_text())
    common = ["train.steps=3", "checkpoint.save_at_end=false", f"data.train_path={data}"]
    on_the_fly = train(tmp_path, "otf", *common, "train.reference=on_the_fly", data=str(data))
    run_distributed(run_cli_worker, 2, "rao_megatron.cli.precompute_reference",
                    ["--config", CONFIG, *common, "parallel.tp=2"])
    cache = Path(str(data) + ".ref_logps.safetensors")
    assert cache.is_file()
    # the cache made at TP2 holds what TP1 computes, to fp32 rounding of sums of ~40 log-probs (seen 2.3e-7
    # relative); a misaligned or wrong entry is off by whole log-probs
    run_distributed(run_cli_worker, 1, "rao_megatron.cli.precompute_reference",
                    ["--config", CONFIG, *common, f"data.reference_cache={tmp_path / 'tp1.safetensors'}"])
    tp2_cache, tp1_cache = load_file(str(cache)), load_file(str(tmp_path / "tp1.safetensors"))
    assert torch.equal(tp2_cache["seq_keys"], tp1_cache["seq_keys"])
    for key in ("prompt_logps", "response_logps"):
        torch.testing.assert_close(tp2_cache[key], tp1_cache[key], rtol=1e-4, atol=0)
    cached = train(tmp_path, "cached", *common, "train.reference=cached", data=str(data))
    assert_same_losses(losses(cached), losses(on_the_fly), "cached vs on the fly")
    # a cache made for other data is refused, naming the mismatch
    data.write_text(Path(DATA).read_text().replace("Repeat", "Echo", 1))
    result = tmp_path / "stale.txt"
    run_distributed(run_cli_worker, 1, "rao_megatron.cli.train",
                    ["--config", CONFIG, *common, "train.reference=cached", f"train.output_dir={tmp_path / 's'}"],
                    str(result))
    code, err = result.read_text().split("\n", 1)
    assert code == "2"
    assert "was computed for other data" in err and str(cache) in err


def test_thirty_steps_of_rao_lower_the_loss(tmp_path):
    out = train(tmp_path, "rao30", "train.steps=30", "train.eval_every=10")
    values = losses(out)
    assert len(values) == 30
    assert sum(values[-5:]) / 5 < 0.7 * sum(values[:5]) / 5
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("lr", "grad_norm", "tokens_per_s", "rewards/best", "rewards/worst", "rewards/gap", "log_z",
                "residual", "ranking_accuracy", "displacement"):
        assert key in records[-1], key
    assert "eval/loss" in records[9] and "eval/loss" in records[29]
    assert (out / "plots" / "loss.png").is_file()
    assert (out / "checkpoints" / "step_0000030" / "rao_model.json").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000030"
    assert (out / "tensorboard").is_dir()


@pytest.mark.parametrize("loss,extra", [
    ("dpo", []), ("ipo", []), ("slic", []), ("simpo", []), ("orpo", []), ("rpo", []), ("cal_dpo", []),
    ("sft", ["train.task=sft"]), ("bt", ["train.task=rm"]),
    ("grao", [f"data.train_path={ROOT / 'examples/data/tiny_grao.jsonl'}"]),
])
def test_every_loss_trains_through_the_cli(tmp_path, loss, extra):
    data = next((e.split("=", 1)[1] for e in extra if e.startswith("data.train_path=")), DATA)
    overrides = [e for e in extra if not e.startswith("data.train_path=")]
    out = train(tmp_path, loss, f"loss.name={loss}", "loss.beta=0.5" if loss not in ("sft", "bt", "orpo") else
                "train.seed=1", "train.steps=3", "checkpoint.save_at_end=false", *overrides, data=data)
    values = losses(out)
    assert len(values) == 3 and all(v == v for v in values)


def _fail(tmp_path: Path, *overrides: str, data: str = DATA) -> str:
    result = tmp_path / "result.txt"
    run_distributed(run_cli_worker, 1, "rao_megatron.cli.train",
                    ["--config", CONFIG, f"data.train_path={data}", f"train.output_dir={tmp_path / 'o'}",
                     "train.steps=1", *overrides], str(result))
    code, err = result.read_text().split("\n", 1)
    assert code == "2", err
    assert "Traceback" not in err
    return err


def test_t0_violation_names_the_row(tmp_path):
    # A base model's "role: content" template has no fixed first token: a row with a system turn starts
    # with "s", the others with "u" -- the t0 rule must stop the run and name that row.
    from rao_megatron.data import TINY_TOKENIZER_DIR

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for f in Path(TINY_TOKENIZER_DIR).iterdir():
        (tok_dir / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    rows = Path(DATA).read_text().splitlines()[:8]
    row = json.loads(rows[5])
    row["messages"] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": row.pop("prompt")}]
    rows[5] = json.dumps(row)
    bad = tmp_path / "t0.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    err = _fail(tmp_path, f"model.tokenizer={tok_dir}", data=str(bad))
    assert f"{bad}: line 6" in err and "t0" in err, err


def test_overlength_rows_are_counted(tmp_path):
    # sequences are 35-41 tokens long; at max_length 38 some responses are dropped and reported
    out = tmp_path / "ol"
    argv = ["--config", CONFIG, f"train.output_dir={out}", "data.max_length=38", "train.steps=1",
            "checkpoint.save_at_end=false"]
    proc = subprocess.run([sys.executable, "-m", "rao_megatron.cli.train", *argv], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = proc.stdout
    assert "examples/data/tiny_groups.jsonl: 64 rows read" in summary, summary
    assert "longer than max_length" in summary or "overlength" in summary, summary
    proc = subprocess.run([sys.executable, "-m", "rao_megatron.cli.train", *argv, "data.overlength=truncate"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert " 0 responses truncated" not in proc.stdout, proc.stdout


def test_bad_config_is_one_line_error(tmp_path):
    err = _fail(tmp_path, "loss.beta=-1")
    assert "config key 'loss.beta'" in err and err.count("\n") <= 1


def test_a_group_that_cannot_fit_one_packed_micro_batch_is_named(tmp_path):
    # one row of 64 tokens per micro-batch cannot hold a group of 4 responses: refused up front, naming the row
    err = _fail(tmp_path, "data.micro_batch_tokens=64")
    line = err.strip().splitlines()[-1]
    assert "examples/data/tiny_groups.jsonl: row " in line and "do not fit one micro-batch of 1 rows x 64" in line, err
    assert "data.micro_batch_tokens" in line
    assert not (tmp_path / "o").exists()


def test_packed_and_padded_runs_train_the_same(tmp_path):
    # the whole pipeline (tokenizer, batcher, cache lookups, reductions) packed vs padded: same loss curve
    packed = losses(train(tmp_path, "packed", "train.steps=4", "train.reference=on_the_fly"))
    padded = losses(train(tmp_path, "padded", "train.steps=4", "train.reference=on_the_fly", "data.packing=false"))
    assert_same_losses(packed, padded, "packed vs padded")


def test_shared_prompt_runs_train_like_one_prompt_per_response_and_share_the_cache(tmp_path):
    # the whole pipeline with each group's prompt held once (data.shared_prompt, on by default on the CPU) vs
    # one prompt per response: the same loss curve; and a reference cache made in one layout serves the other
    # (the step-0 check compares it with the policy's own log-probs)
    data = tmp_path / "groups.jsonl"
    data.write_text(Path(DATA).read_text())
    common = ["train.steps=3", "checkpoint.save_at_end=false", f"data.train_path={data}"]
    cache = tmp_path / "unshared.safetensors"
    run_distributed(run_cli_worker, 1, "rao_megatron.cli.precompute_reference",
                    ["--config", CONFIG, *common, "data.shared_prompt=false", f"data.reference_cache={cache}",
                     f"train.output_dir={tmp_path / 'pre'}"])
    shared = records(train(tmp_path, "shared", *common, "train.reference=cached", f"data.reference_cache={cache}",
                           data=str(data)))
    unshared = records(train(tmp_path, "unshared", *common, "train.reference=on_the_fly", "data.shared_prompt=false",
                             data=str(data)))
    assert_same_losses([r["loss"] for r in shared], [r["loss"] for r in unshared], "shared vs unshared prompts")
    # K = 4 responses per group: a shared prompt stands for four
    assert all(r["shared_prompt_ratio"] > 1.5 for r in shared), shared
    assert all(r["shared_prompt_ratio"] == 1.0 for r in unshared), unshared


def test_data_is_tokenized_once_into_a_shared_store(tmp_path):
    # DP2: rank 0 builds the store, both ranks train from the memory-mapped arrays; a rerun reuses it and
    # changed data gets a store of its own
    data = tmp_path / "data.jsonl"
    data.write_text(Path(DATA).read_text())
    first = losses(train(tmp_path, "a", "train.steps=2", world=2, data=str(data)))
    stores = sorted((tmp_path / "data.jsonl.tokens").iterdir())
    assert len(stores) == 1 and (stores[0] / "tokens.npy").is_file()
    stamp = (stores[0] / "tokens.npy").stat().st_mtime_ns
    again = losses(train(tmp_path, "b", "train.steps=2", world=2, data=str(data)))
    assert again == first and (stores[0] / "tokens.npy").stat().st_mtime_ns == stamp  # reused, not rebuilt
    unstored = losses(train(tmp_path, "c", "train.steps=2", "data.token_store=false", world=2, data=str(data)))
    assert unstored == first
    data.write_text("".join(Path(DATA).read_text().splitlines(keepends=True)[:40]))
    train(tmp_path, "d", "train.steps=2", world=2, data=str(data))
    assert len(list((tmp_path / "data.jsonl.tokens").iterdir())) == 2


def test_bf16_run_saves_and_resumes_with_the_mixed_precision_optimizer(tmp_path):
    # bf16 parameters with fp32 master weights (Megatron's Float16 optimizer, CPU's default): the local spec's
    # norms used to stay fp32, which that optimizer's checkpoint cannot map ("Param id ... does not match")
    out = train(tmp_path, "bf16", "model.dtype=bf16", "train.steps=2", "train.reference=on_the_fly")
    assert (out / "checkpoints" / "latest").is_file()
    more = losses(train(tmp_path, "bf16", "model.dtype=bf16", "train.steps=3", "train.reference=on_the_fly"))
    assert len(more) == 3 and all(math.isfinite(x) for x in more)


def _rewards_mapped(tmp_path: Path, name: str, fn) -> str:
    """The tiny data with every reward r replaced by ``fn(r)``."""
    rows = [json.loads(x) for x in Path(DATA).read_text().splitlines() if x.strip()]
    path = tmp_path / name
    path.write_text("".join(json.dumps({**r, "rewards": [fn(v) for v in r["rewards"]]}) + "\n" for r in rows))
    return str(path)


def _reward_stats(out: Path) -> dict:
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text())["loss"]["reward_stats"]


def test_reward_normalization_is_applied_once_with_the_training_set_statistics(tmp_path):
    # z-scored with the training split's own statistics, rewards r and 3r + 7 are the same rewards: the runs
    # match. Applying the map twice, or with other statistics, would tell them apart; so does no normalisation.
    steps = ("train.steps=3", "train.reference=on_the_fly", "loss.reward_normalization=zscore",
             "checkpoint.save_at_end=false")
    raw = losses(train(tmp_path, "raw", *steps))
    mapped_out = train(tmp_path, "mapped", *steps, data=_rewards_mapped(tmp_path, "mapped.jsonl", lambda r: 3 * r + 7))
    assert_same_losses(losses(mapped_out), raw, "zscore of r vs zscore of 3r + 7")
    stats = _reward_stats(mapped_out)
    assert stats["mean"] == pytest.approx(3 * _reward_stats(tmp_path / "raw")["mean"] + 7)
    plain = losses(train(tmp_path, "plain", "train.steps=1", "train.reference=on_the_fly",
                         "loss.reward_normalization=none", "checkpoint.save_at_end=false",
                         data=_rewards_mapped(tmp_path, "mapped.jsonl", lambda r: 3 * r + 7)))
    assert abs(plain[0] - raw[0]) > 0.1 * abs(raw[0])


def test_a_resumed_run_keeps_the_reward_calibration_it_started_with(tmp_path):
    common = ("train.reference=on_the_fly", "loss.reward_normalization=none")
    first = train(tmp_path, "run", "train.steps=2", *common)
    started = _reward_stats(first)
    shifted = _rewards_mapped(tmp_path, "shifted.jsonl", lambda r: r + 0.5)
    resumed = train(tmp_path, "run", "train.steps=3", *common, data=shifted)
    assert len(losses(resumed)) == 3
    assert _reward_stats(resumed) == started  # the checkpoint's statistics, not the new data's
    fresh = _reward_stats(train(tmp_path, "fresh", "train.steps=1", *common, "checkpoint.save_at_end=false",
                                data=shifted))
    assert fresh["mean"] == pytest.approx(started["mean"] + 0.5)
