"""Table-driven bad input: every case is a one-line error naming what and where, exit code 2, no traceback,
and nothing left behind in the output directory."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rao_megatron.parallel.launch import run_distributed

from .train_workers import run_cli_worker

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples/configs/rao_tiny.yaml"
DATA = ROOT / "examples/data/tiny_groups.jsonl"
ROWS = DATA.read_text().splitlines()


def rows_with(index: int, change: Callable[[dict], None], n: int = 8) -> str:
    rows = [json.loads(r) for r in ROWS[:n]]
    change(rows[index])
    return "".join(json.dumps(r) + "\n" for r in rows)


def plain_template_tokenizer(tmp: Path) -> Path:
    from rao_megatron.data import TINY_TOKENIZER_DIR

    d = tmp / "tok_plain"
    d.mkdir()
    for f in Path(TINY_TOKENIZER_DIR).iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def no_template_tokenizer(tmp: Path) -> Path:
    d = plain_template_tokenizer(tmp)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@dataclass
class Case:
    id: str
    expect: tuple[str, ...]                     # substrings of the error line ({tmp} is replaced)
    overrides: tuple[str, ...] = ()
    data: str | None = None                      # content of a data file written to {tmp}/data.jsonl
    setup: Callable[[Path], None] | None = None  # extra preparation in tmp
    config: str | None = None                    # --config (default: the tiny config)
    world: int = 1
    module: str = "rao_megatron.cli.train"
    argv: tuple[str, ...] | None = None          # full argv for non-train modules
    extra: dict = field(default_factory=dict)


def _t0_rows() -> str:
    def change(r: dict) -> None:
        r["messages"] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": r.pop("prompt")}]
    return rows_with(5, change)


def _write_cache_garbage(tmp: Path) -> None:
    (tmp / "data.jsonl.ref_logps.safetensors").write_bytes(b"\x00garbage" * 10)


def _write_other_cache(tmp: Path) -> None:
    from rao_megatron.training.reference_cache import write_cache

    write_cache(tmp / "data.jsonl.ref_logps.safetensors", [1, 2], [0.0, 0.0], [0.0, 0.0],
                {"data": "0" * 32, "tokenizer": "x", "max_length": "64", "overlength": "drop", "model": "m"}, {})


CASES = [
    Case("missing-config", ("config file not found", "{tmp}/nope.yaml"), config="{tmp}/nope.yaml"),
    Case("invalid-yaml", ("is not valid YAML", "{tmp}/bad.yaml"), config="{tmp}/bad.yaml",
         setup=lambda t: (t / "bad.yaml").write_text("loss: [unclosed\n")),
    Case("unknown-key", ("unknown config key 'train.lrr'", "did you mean train.lr"), ("train.lrr=1",)),
    Case("unknown-loss", ("'loss.name'", "unknown loss 'dpp'", "did you mean dpo"), ("loss.name=dpp",)),
    Case("beta-not-positive", ("'loss.beta'", "must be > 0"), ("loss.beta=0",)),
    Case("z0-not-positive", ("'loss.z0'", "must be > 0"), ("loss.z0=-5",)),
    Case("z0-and-log-z0", ("'loss.z0' and 'loss.log_z0'",), ("loss.log_z0=2.0",)),
    Case("missing-data", ("{tmp}/absent.jsonl",), ("data.train_path={tmp}/absent.jsonl",)),
    Case("bad-json-line", ("{tmp}/data.jsonl", "line 3"), data="\n".join(ROWS[:2] + ["{not json"] + ROWS[3:6]) + "\n"),
    Case("missing-field", ("{tmp}/data.jsonl", "line 4", "'responses'"),
         data=rows_with(3, lambda r: r.pop("responses"))),
    Case("nan-reward", ("{tmp}/data.jsonl", "line 2", "'rewards[1]'"),
         data=rows_with(1, lambda r: r["rewards"].__setitem__(1, float("nan")))),
    Case("non-numeric-reward", ("{tmp}/data.jsonl", "line 7", "'rewards[0]'"),
         data=rows_with(6, lambda r: r["rewards"].__setitem__(0, "high"))),
    Case("empty-response", ("{tmp}/data.jsonl", "line 5", "'responses[2]'"),
         data=rows_with(4, lambda r: r["responses"].__setitem__(2, ""))),
    Case("reward-count", ("{tmp}/data.jsonl", "line 1", "'rewards'"),
         data=rows_with(0, lambda r: r["rewards"].pop())),
    Case("t0-mismatch", ("{tmp}/data.jsonl", "line 6", "t0"), ("model.tokenizer={tmp}/tok_plain",),
         data=_t0_rows(), setup=plain_template_tokenizer),
    Case("overlength-error", ("{tmp}/data.jsonl", "line 1", "longer than max_length=30"),
         ("data.overlength=error", "data.max_length=30"), data="".join(r + "\n" for r in ROWS[:8])),
    Case("tp-not-dividing-heads", ("tp=3",), ("parallel.tp=3",), world=3),
    Case("world-not-divisible", ("world size 1 is not divisible", "parallel.tp × parallel.pp = 2 × 1"),
         ("parallel.tp=2",)),
    Case("no-chat-template", ("{tmp}/tok_plain", "chat template"), ("model.tokenizer={tmp}/tok_plain",),
         setup=no_template_tokenizer),
    Case("cache-other-data", ("was computed for other data",), ("train.reference=cached",),
         data="".join(r + "\n" for r in ROWS[:8]), setup=_write_other_cache),
    Case("cache-corrupt", ("not a readable safetensors file",), ("train.reference=cached",),
         data="".join(r + "\n" for r in ROWS[:8]), setup=_write_cache_garbage),
    Case("cache-missing", ("reference cache not found",), ("train.reference=cached",),
         data="".join(r + "\n" for r in ROWS[:8])),
    Case("init-checkpoint-missing", ("{tmp}/ckpt",), ("model.init_checkpoint={tmp}/ckpt",)),
    Case("init-checkpoint-not-one", ("{tmp}/empty", "not a rao_megatron model checkpoint"),
         ("model.init_checkpoint={tmp}/empty",), setup=lambda t: (t / "empty").mkdir()),
    Case("rewards-needed", ("needs rewards", "{tmp}/data.jsonl"), (),
         data='{"prompt": "p", "chosen": "a", "rejected": "b"}\n' * 6),
    Case("batch-split", ("'train.global_batch_groups'", "global_batch_groups=5"), ("train.global_batch_groups=5",)),
    Case("task-loss-mismatch", ("train.task=rm trains with loss 'bt'",), ("train.task=rm",)),
    Case("resume-missing", ("'checkpoint.resume'", "{tmp}/gone"), ("checkpoint.resume={tmp}/gone",)),
    Case("precompute-bad-data", ("{tmp}/data.jsonl", "line 3"), module="rao_megatron.cli.precompute_reference",
         data="\n".join(ROWS[:2] + ["{not json"]) + "\n"),
    Case("convert-missing-hf", ("{tmp}/hf",), module="rao_megatron.cli.convert",
         argv=("hf-to-megatron", "--hf", "{tmp}/hf", "--out", "{tmp}/out")),
    # cluster settings take effect or are refused: never a silent CPU run or an ignored key
    Case("sequence-parallel-without-tp", ("'parallel.sequence_parallel'", "parallel.tp > 1"),
         ("parallel.sequence_parallel=true",)),
    Case("sequence-parallel-without-te", ("sequence parallelism needs the Transformer Engine",),
         ("parallel.sequence_parallel=true", "parallel.tp=2"), world=2),
    Case("device-cuda-without-gpu", ("'parallel.device' is cuda", sys.executable),
         ("parallel.device=cuda",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(tmp_path, case):
    sub = lambda s: s.replace("{tmp}", str(tmp_path))  # noqa: E731
    if case.setup:
        case.setup(tmp_path)
    out = tmp_path / "out"
    if case.argv is not None:
        argv = [sub(a) for a in case.argv]
    else:
        argv = ["--config", sub(case.config) if case.config else str(CONFIG), f"train.output_dir={out}",
                "train.steps=2"]
        if case.data is not None:
            (tmp_path / "data.jsonl").write_text(case.data)
            argv.append(f"data.train_path={tmp_path / 'data.jsonl'}")
        argv += [sub(o) for o in case.overrides]
    result = tmp_path / "result.txt"
    run_distributed(run_cli_worker, case.world, case.module, argv, str(result))
    code, err = result.read_text().split("\n", 1)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert code == "2", err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for text in case.expect:
        assert sub(text) in lines[0], f"{sub(text)!r} not in {lines[0]!r}"
    assert not out.exists(), "partial output left behind"
    assert not (tmp_path / "data.jsonl.ref_logps.safetensors.tmp").exists()


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 20
