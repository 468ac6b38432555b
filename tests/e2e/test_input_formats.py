"""The data users already have trains from the command line (every TRL preference / prompt format), a
rescored data set keeps its reference cache, data problems that are not errors are warned about with
counts, and under torchrun a user error is one line with every rank exiting 2."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rao_megatron.parallel.launch import run_distributed

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "examples/configs/rao_tiny.yaml")
ROWS = [json.loads(line) for line in (ROOT / "examples/data/tiny_groups.jsonl").read_text().splitlines()][:16]
SYSTEM = {"role": "system", "content": "Answer with letters only."}


def cli_worker(module: str, argv: list[str], result_path: str) -> None:
    """Run a CLI in this rank with stdout and stderr captured; rank 0 writes ``code``, stdout, stderr."""
    import importlib

    import torch.distributed as dist

    from rao_megatron.cli.common import run_cli

    mod = importlib.import_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(mod.main, mod.parser(), argv)
    if dist.get_rank() == 0:
        Path(result_path).write_text(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue()}))


def run(tmp: Path, module: str, *argv: str, world: int = 1) -> dict:
    result = tmp / "result.json"
    run_distributed(cli_worker, world, module, list(argv), str(result))
    return json.loads(result.read_text())


def _best_worst(r: dict) -> tuple[str, str]:
    order = sorted(range(len(r["responses"])), key=lambda j: -r["rewards"][j])
    return r["responses"][order[0]], r["responses"][order[-1]]


def _user(r: dict) -> dict:
    return {"role": "user", "content": r["prompt"]}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _rows(fmt: str) -> list[dict]:
    out = []
    for i, r in enumerate(ROWS):
        r = dict(r, prompt=f"{r['prompt']} (#{i})")  # 16 distinct prompts
        best, worst = _best_worst(r)
        if fmt == "standard-explicit":
            out.append({"prompt": r["prompt"], "chosen": best, "rejected": worst})
        elif fmt == "standard-implicit":
            out.append({"chosen": f"{r['prompt']} {best}", "rejected": f"{r['prompt']} !{worst}"})
        elif fmt == "conversational-explicit":
            out.append({"prompt": [_user(r)], "chosen": [_assistant(best)], "rejected": [_assistant(worst)]})
        elif fmt == "conversational-implicit-system":
            out.append({"chosen": [SYSTEM, _user(r), _assistant(best)],
                        "rejected": [SYSTEM, _user(r), _assistant(worst)]})
        elif fmt == "conversational-multi-turn":
            prompt = [SYSTEM, _user(r), _assistant("Which letter?"), {"role": "user", "content": "The one I said."}]
            out.append({"prompt": prompt, "chosen": [_assistant(best)], "rejected": [_assistant(worst)]})
        elif fmt == "unpaired":
            out += [{"prompt": [_user(r)], "completion": [_assistant(y)], "label": y == best} for y in r["responses"]]
        elif fmt == "prompt-completion":
            out.append({"prompt": r["prompt"], "completion": best})
    return out


FORMATS = {  # format -> (loss overrides, groups kept of the 16 prompts, responses kept)
    "standard-explicit": (("loss.name=dpo",), 16, 32),
    "standard-implicit": (("loss.name=dpo",), 16, 32),
    "conversational-explicit": (("loss.name=dpo",), 16, 32),
    "conversational-implicit-system": (("loss.name=dpo", "data.max_length=128"), 16, 32),
    "conversational-multi-turn": (("loss.name=dpo", "data.max_length=128"), 16, 32),
    "unpaired": ((), 16, 64),  # RAO on groups of 4 with rewards 1 / 0
    "prompt-completion": (("train.task=sft", "loss.name=sft"), 16, 16),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_trl_formats_train_from_the_cli(tmp_path, fmt):
    overrides, groups, responses = FORMATS[fmt]
    data = tmp_path / f"{fmt}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(fmt)))
    res = run(tmp_path, "rao_megatron.cli.train", "--config", CONFIG, f"data.train_path={data}",
              f"train.output_dir={tmp_path / 'out'}", "train.steps=1", "checkpoint.save_at_end=false", *overrides)
    assert res["code"] == 0, res["err"]
    rows = len(_rows(fmt))
    assert f"{rows} rows read, {groups} groups kept with {responses} responses" in res["out"], res["out"]


def test_rescored_data_keeps_its_cache_and_data_problems_are_warned(tmp_path):
    data = tmp_path / "groups.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    common = ["--config", CONFIG, f"data.train_path={data}", f"train.output_dir={tmp_path / 'out'}",
              "train.steps=1", "checkpoint.save_at_end=false"]
    assert run(tmp_path, "rao_megatron.cli.precompute_reference", *common)["code"] == 0
    # new rewards (an annotator rerun) and a repeated row: no log-prob changes, so the cache still applies
    rescored = [dict(r, rewards=[round(1 - x, 4) for x in r["rewards"]]) for r in ROWS] + [ROWS[3]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rescored))
    res = run(tmp_path, "rao_megatron.cli.train", *common, "train.reference=cached", f"data.eval_path={data}")
    assert res["code"] == 0, res["err"]
    out = res["out"]
    assert "reference check at step 0" in out and "limit 0.02/token" in out, out
    assert "reference log-probs: cached" in out
    assert f"warning: {data}: 1 rows repeat an earlier row (same prompt and responses), e.g. line 17 repeats line 4" \
        in out, out
    assert f"warning: data.eval_path is data.train_path ({data})" in out


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "rao_megatron.cli.train",
            "--config", CONFIG]


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], "error: unknown config key 'train.lrr'"),  # before the process group exists
    (["parallel.pp=2", "parallel.vpp=2"], "error: num_hidden_layers=2 is not divisible by parallel.pp × "
                                          "parallel.vpp=4"),    # after: the layout check
])
def test_under_torchrun_a_user_error_is_one_line_and_every_rank_exits_2(tmp_path, overrides, message):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.run([*TORCHRUN, f"train.output_dir={tmp_path / 'out'}", *overrides], capture_output=True,
                          text=True, env=env, timeout=240, cwd=ROOT)
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if line.startswith("error:") or "] error:" in line]
    assert errors == [errors[0]] and errors[0].startswith(message), text[-3000:]
    assert text.count("exitcode  : 2") == 2, text[-3000:]  # torchrun's report: both ranks exited 2
    assert proc.returncode == 1  # torchrun's own code for any failed worker (see slurm/common.sh, README)
    assert not (tmp_path / "out").exists()
