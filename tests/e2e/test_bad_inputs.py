"""Table-driven bad input: every case is a one-line error naming what and where, exit code 2, no traceback,
and nothing left behind in the output directory."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rao_megatron.data.tokenizer import TINY_TOKENIZER_DIR
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
    data_bytes: bytes | None = None              # raw bytes of {tmp}/data.jsonl (encodings, binary)
    absent: tuple[str, ...] = ()                 # paths that must not exist afterwards ({tmp} is replaced)


def _t0_rows() -> str:
    def change(r: dict) -> None:
        r["messages"] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": r.pop("prompt")}]
    return rows_with(5, change)


def _write_cache_garbage(tmp: Path) -> None:
    (tmp / "data.jsonl.ref_logps.safetensors").write_bytes(b"\x00garbage" * 10)


def _run_identity(tmp: Path, *overrides: str) -> tuple[dict, dict, list[tuple[int, str]]]:
    """What a tiny run on {tmp}/data.jsonl expects of its reference cache: fingerprints, info, sequences."""
    from rao_megatron.config import load_config
    from rao_megatron.training import model_init, reference, run_data

    cfg = load_config(CONFIG, [f"data.train_path={tmp / 'data.jsonl'}", *overrides])
    tok = run_data.load_run_tokenizer(cfg)
    groups = run_data.load_groups(cfg, tok, cfg.loss.build().spec)
    ((path, file_groups),) = groups.files(cfg)
    arch = model_init.resolve_arch(cfg, tok)
    fp, info = reference.reference_fingerprints(cfg, tok, reference.model_identity(cfg, arch), file_groups)
    return fp, info, reference.file_sequences(file_groups, groups.where[path])


def _cache(*, overrides: tuple[str, ...] = (), skip_row: str | None = None, value: float = -3.0,
           fmt: str | None = None, **changes: str) -> Callable[[Path], None]:
    """A setup writing {tmp}/data.jsonl's cache as the run expects it, but with ``changes`` to its
    fingerprints, the sequences of ``skip_row`` left out, every log-prob ``value`` and header ``fmt``."""
    def setup(tmp: Path) -> None:
        from rao_megatron.training.reference_cache import FORMAT, write_cache

        fp, info, seqs = _run_identity(tmp, *overrides)
        keys = [k for k, where in seqs if where != skip_row]
        write_cache(tmp / "data.jsonl.ref_logps.safetensors", keys, [value] * len(keys), [value] * len(keys),
                    {**fp, **changes}, {**info, "info_model_source": "elsewhere"})
        if fmt is not None:
            from safetensors.torch import load_file, save_file

            path = tmp / "data.jsonl.ref_logps.safetensors"
            save_file(load_file(str(path)), str(path), metadata={"format": fmt})
            assert fmt != FORMAT
    return setup


def _write_other_cache(tmp: Path) -> None:
    from rao_megatron.training.reference_cache import write_cache

    fp, info, _ = _run_identity(tmp)
    write_cache(tmp / "data.jsonl.ref_logps.safetensors", [1, 2], [0.0, 0.0], [0.0, 0.0],
                {**fp, "data": "0" * 32}, info)


def _replaced_checkpoint(tmp: Path) -> None:
    """A cache for {tmp}/ckpt, then another model written over that checkpoint in place (same file names
    and sizes, new weights)."""
    import json as _json

    from rao_megatron.data import load_tokenizer
    from rao_megatron.models.hf_config import tiny_hf_config
    from rao_megatron.training.reference_cache import write_cache

    tok = load_tokenizer(None)
    hf = tiny_hf_config("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    (ckpt / "rao_model.json").write_text(_json.dumps({"hf_config": hf.to_dict(), "task": "policy"}))
    (ckpt / "__0_0.distcp").write_bytes(bytes(range(256)) * 12288)  # 3 MiB of "weights"
    fp, info, seqs = _run_identity(tmp, f"model.init_checkpoint={ckpt}")
    keys = [k for k, _ in seqs]
    write_cache(tmp / "data.jsonl.ref_logps.safetensors", keys, [0.0] * len(keys), [0.0] * len(keys), fp, info)
    (ckpt / "__0_0.distcp").write_bytes(bytes(range(255, -1, -1)) * 12288)  # replaced in place


def _small_vocab_model(tmp: Path) -> None:
    from rao_megatron.models.hf_config import tiny_hf_config

    (tmp / "hf").mkdir()
    tiny_hf_config("llama", vocab_size=128).save_pretrained(str(tmp / "hf"))


def _read_only(tmp: Path) -> None:
    """{tmp}/ro: a directory no file can be created in (root ignores modes: /sys refuses new files)."""
    import os

    d = tmp / "ro"
    if os.geteuid() != 0:
        d.mkdir()
        d.chmod(0o555)
    else:
        d.symlink_to("/sys")


def string_reward(prompt, response) -> str:
    """A reward function with a bug: it returns text."""
    return "high"


def _pairs(tmp: Path) -> None:
    (tmp / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n"
                                             for i in range(3)))


def _answers(tmp: Path) -> None:
    rows = [{"id": 1, "prompt": "1+1?", "responses": ["2"], "answer": "2"}, {"id": 2, "prompt": "2+2?", "responses": ["4"]}]
    (tmp / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "afile").write_text("not a directory\n")


def _empty_section_config(tmp: Path) -> None:
    text = CONFIG.read_text().replace("checkpoint:\n  save_at_end: true", "checkpoint:\n  # save_at_end: true")
    assert "  # save_at_end" in text
    (tmp / "empty_section.yaml").write_text(text)


def _row(line: int, change: Callable[[dict], None]) -> str:
    return rows_with(line - 1, change)


def _trl_disagreeing(r: dict) -> None:
    r.clear()
    r.update(prompt="What is 2+2?", chosen=[{"role": "user", "content": "What is 3+3?"},
                                            {"role": "assistant", "content": "6"}],
             rejected=[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}])


def _data_directory(tmp: Path) -> None:
    d = tmp / "prefs"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(r + "\n" for r in ROWS[:3]))
    (d / "b.jsonl").write_text(rows_with(2, lambda r: r["rewards"].__setitem__(0, "high"), n=4))


def _one_object_json(tmp: Path) -> None:
    (tmp / "one.json").write_text(json.dumps(json.loads(ROWS[0]), indent=2) + "\n")


def _truncated_safetensors(tmp: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from rao_megatron.models.hf_config import tiny_hf_config

    hf = tmp / "hf"
    tiny_hf_config("llama").save_pretrained(str(hf))
    save_file({"model.embed_tokens.weight": torch.zeros(64, 32)}, str(hf / "model.safetensors"))
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download


def _duplicate_key_config(tmp: Path) -> None:
    (tmp / "dup.yaml").write_text(CONFIG.read_text() + "\ntrain:\n  lr: 1.0e-3\n")


def _earlier_run(tmp: Path) -> None:
    """{tmp}/first: the tiny RAO run (two steps, global batch 4, seed 1234) with its checkpoint."""
    run_distributed(run_cli_worker, 1, "rao_megatron.cli.train",
                    ["--config", str(CONFIG), f"train.output_dir={tmp / 'first'}", "train.steps=2",
                     "train.eval_every=0"])


CASES = [
    Case("missing-config", ("config file not found", "{tmp}/nope.yaml"), config="{tmp}/nope.yaml"),
    Case("invalid-yaml", ("is not valid YAML", "{tmp}/bad.yaml", "line 2, column 1: expected ',' or ']'"),
         config="{tmp}/bad.yaml",
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
    Case("batch-split", ("'train.global_batch_groups'", "global_batch_groups=5"),
         ("train.global_batch_groups=5", "data.packing=false")),
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
    # -- issue 18: the reference cache is bound to content, checked in full at start-up ----------------
    Case("cache-other-model", ("was computed for another model", "model: cache '00000000", "from elsewhere",
                               "from random init of tiny-llama"), ("train.reference=cached",),
         data="".join(r + "\n" for r in ROWS[:8]), setup=_cache(model="0" * 32)),
    Case("cache-checkpoint-replaced-in-place", ("was computed for another model", "from {tmp}/ckpt, run"),
         ("train.reference=cached", "model.init_checkpoint={tmp}/ckpt"),
         data="".join(r + "\n" for r in ROWS[:8]), setup=_replaced_checkpoint),
    Case("cache-other-dtype", ("another model.dtype", "dtype: cache 'fp32', run 'bf16'"),
         ("train.reference=cached", "model.dtype=bf16"), data="".join(r + "\n" for r in ROWS[:8]),
         setup=_cache()),
    Case("cache-other-logprob-precision", ("logprob_precision: cache 'fp32', run 'bf16'",),
         ("train.reference=cached", "model.logprob_precision=bf16"), data="".join(r + "\n" for r in ROWS[:8]),
         setup=_cache()),
    Case("cache-old-format", ("field 'format' differs", "reference_logps/1", "recompute"),
         ("train.reference=cached",), data="".join(r + "\n" for r in ROWS[:8]),
         setup=_cache(fmt="rao_megatron.reference_logps/1")),
    Case("cache-lacks-rows", ("has no entry for 3 of 32 sequences", "sequences of {tmp}/data.jsonl, the first {tmp}/data.jsonl line 5"),
         ("train.reference=cached",), data="".join(r + "\n" for r in ROWS[:8]),
         setup=_cache(skip_row="line 5")),
    Case("cache-stale-values-step0", ("does not match the initial model", "nats per token, above 0.02"),
         ("train.reference=cached",), data="".join(r + "\n" for r in ROWS[:8]), setup=_cache()),
    # -- up-front checks: before anything is built or written ---------------------------------------
    Case("tokenizer-larger-than-vocab", ("tokens but the model", "vocab_size=128", "'model.tokenizer'"),
         ("model.hf_config={tmp}/hf", "model.preset=null", f"model.tokenizer={TINY_TOKENIZER_DIR}"),
         setup=_small_vocab_model),
    Case("output-dir-is-a-file", ("'train.output_dir'", "{tmp}/afile is a file, not a directory"),
         ("train.output_dir={tmp}/afile",), setup=lambda t: (t / "afile").write_text("x\n")),
    Case("output-dir-is-a-file-tp2", ("'train.output_dir'", "is a file, not a directory"),
         ("train.output_dir={tmp}/afile", "parallel.tp=2"), world=2, setup=lambda t: (t / "afile").write_text("x\n")),
    Case("output-dir-read-only", ("'train.output_dir'", "{tmp}/ro/run is not writable"),
         ("train.output_dir={tmp}/ro/run",), setup=_read_only),
    Case("precompute-cache-read-only", ("reference cache", "is not writable", "set data.reference_cache"),
         ("data.reference_cache={tmp}/ro/c.safetensors",), module="rao_megatron.cli.precompute_reference",
         data="".join(r + "\n" for r in ROWS[:8]), setup=_read_only),
    Case("precompute-cache-is-a-directory", ("reference cache", "is a directory, not a file"),
         ("data.reference_cache={tmp}",), module="rao_megatron.cli.precompute_reference",
         data="".join(r + "\n" for r in ROWS[:8])),
    Case("layout-vpp-not-dividing-layers", ("num_hidden_layers=2 is not divisible by parallel.pp × parallel.vpp=4",),
         ("parallel.pp=2", "parallel.vpp=2"), world=2),
    Case("reward-401-digit-integer", ("{tmp}/data.jsonl", "line 2", "'rewards[1]'", "about 401 digits"),
         data=rows_with(1, lambda r: r["rewards"].__setitem__(1, 10 ** 400))),
    Case("reward-1e300", ("{tmp}/data.jsonl", "line 3", "'rewards[0]'", "at most 1e+06, got 1e+300"),
         data=rows_with(2, lambda r: r["rewards"].__setitem__(0, 1e300))),
    Case("deeply-nested-json", ("{tmp}/data.jsonl", "line 3", "nested too deeply"),
         data="\n".join(ROWS[:2] + ["[" * 200_000] + ROWS[3:6]) + "\n"),
    Case("binary-data-file", ("{tmp}/data.jsonl", "line 2", "not UTF-8 text (byte 0xff"),
         data_bytes=(ROWS[0] + "\n").encode() + bytes(range(255, 0, -1)) + b"\n"),
    Case("utf16-data-file", ("{tmp}/data.jsonl", "UTF-16 text", "iconv"),
         data_bytes="".join(r + "\n" for r in ROWS[:4]).encode("utf-16")),
    Case("unknown-role", ("{tmp}/data.jsonl", "line 4", "'messages[0].role'", "role 'wizard'"),
         data=rows_with(3, lambda r: r.update(messages=[{"role": "wizard", "content": r.pop("prompt")}]))),
    Case("trl-context-disagrees-with-prompt", ("{tmp}/data.jsonl", "line 1", "field 'chosen'", "differs from 'prompt'"),
         data=rows_with(0, _trl_disagreeing, n=1)),
    Case("unpaired-label-not-bool", ("{tmp}/data.jsonl", "line 1", "field 'label'", "expected true or false"),
         data='{"prompt": "p", "completion": "c", "label": "yes"}\n'),
    Case("prompt-only-rows-for-training", ("{tmp}/data.jsonl", "line 1", "prompt-only rows", "cli.generate"),
         data='{"prompt": "The sky is"}\n'),
    Case("yaml-a-list", ("config file in {tmp}/list.yaml must be a mapping",), config="{tmp}/list.yaml",
         setup=lambda t: (t / "list.yaml").write_text("- train.steps=2\n")),
    Case("yaml-not-utf8", ("config file {tmp}/bin.yaml is not UTF-8 text",), config="{tmp}/bin.yaml",
         setup=lambda t: (t / "bin.yaml").write_bytes(b"train:\n  steps: \xff\n")),
    # an empty section (keys commented out) loads: the error is the next problem, the missing data file
    Case("yaml-empty-section-loads", ("{tmp}/absent.jsonl", "no such file"), ("data.train_path={tmp}/absent.jsonl",),
         config="{tmp}/empty_section.yaml", setup=_empty_section_config),
    # -- annotate and evaluate -------------------------------------------------------------------------
    Case("annotate-rejects-every-row", ("all 3 rows of {tmp}/pairs.jsonl were rejected", "nothing was written",
                                        "line 1, field 'chosen'", "got str 'high'"),
         module="rao_megatron.cli.annotate", setup=_pairs, absent=("{tmp}/scored.jsonl",),
         argv=("--data", "{tmp}/pairs.jsonl", "--out", "{tmp}/scored.jsonl", "--no-progress",
               "--reward-fn", f"{__name__}:string_reward")),
    Case("annotate-out-is-a-directory", ("--out", "{tmp} is a directory, not a file"), module="rao_megatron.cli.annotate",
         setup=_pairs, argv=("--data", "{tmp}/pairs.jsonl", "--out", "{tmp}", "--reward-fn",
                             "rao_megatron.rewards.rule:letter_share")),
    Case("evaluate-rows-lack-answer", ("{tmp}/answers.jsonl", "line 2", "field 'answer'", "missing in 1 of 2 rows (line 2)"),
         module="rao_megatron.cli.evaluate", setup=_answers, absent=("{tmp}/eval.md",),
         argv=("--answers", "{tmp}/answers.jsonl", "--out-dir", "{tmp}/out")),
    Case("evaluate-out-dir-is-a-file", ("--out-dir", "{tmp}/afile is a file, not a directory"),
         module="rao_megatron.cli.evaluate", setup=_answers,
         argv=("--answers", "{tmp}/answers.jsonl", "--out-dir", "{tmp}/afile", "--reward-fn",
               "rao_megatron.rewards.rule:exact_final_number")),
    # -- issue 27: no command writes over its inputs; ~ and $VARIABLES expanded, one rule everywhere ----
    Case("annotate-out-is-the-input", ("--out {tmp}/./pairs.jsonl is the same path as --data {tmp}/pairs.jsonl",
                                       "never writes over its input"),
         module="rao_megatron.cli.annotate", setup=_pairs, absent=("{tmp}/pairs.jsonl.partial.jsonl",),
         argv=("--data", "{tmp}/pairs.jsonl", "--out", "{tmp}/./pairs.jsonl", "--reward-fn",
               "rao_megatron.rewards.rule:letter_share")),
    Case("generate-out-is-the-prompts", ("--out {tmp}/pairs.jsonl is the same path as --prompts",),
         module="rao_megatron.cli.generate", setup=_pairs,
         argv=("--model", "{tmp}/m", "--prompts", "{tmp}/pairs.jsonl", "--out", "{tmp}/pairs.jsonl")),
    Case("evaluate-report-over-the-answers", ("--out-dir {tmp}/eval.json is the same path as --answers",),
         module="rao_megatron.cli.evaluate", setup=lambda t: (t / "eval.json").write_text("[]\n"),
         argv=("--answers", "{tmp}/eval.json", "--out-dir", "{tmp}")),
    Case("convert-out-is-the-hf-dir", ("--out {tmp}/hf is the same path as --hf {tmp}/hf",),
         module="rao_megatron.cli.convert", setup=_small_vocab_model,
         argv=("hf-to-megatron", "--hf", "{tmp}/hf", "--out", "{tmp}/hf")),
    Case("precompute-cache-is-the-data", ("config keys 'data.reference_cache' and 'data.train_path'",
                                          "would write over its input"),
         ("data.reference_cache={tmp}/data.jsonl",), module="rao_megatron.cli.precompute_reference",
         data="".join(r + "\n" for r in ROWS[:8])),
    Case("tilde-in-data-path-is-home", (f"{Path.home()}/rao-absent-27.jsonl", "no such file"),
         ("data.train_path=~/rao-absent-27.jsonl",)),
    Case("unset-variable-in-output-dir", ("'train.output_dir'", "environment variable $RAO_UNSET_27",
                                          "is not set"),
         ("train.output_dir=$RAO_UNSET_27/run",), absent=("$RAO_UNSET_27",)),
    # -- issue 27: OS and library errors on the user's path are one line -------------------------------
    Case("convert-truncated-safetensors", ("{tmp}/hf/model.safetensors: not a readable safetensors file",
                                           "interrupted download"),
         module="rao_megatron.cli.convert", setup=_truncated_safetensors,
         argv=("hf-to-megatron", "--hf", "{tmp}/hf", "--out", "{tmp}/out")),
    Case("data-directory-bad-row", ("{tmp}/prefs: b.jsonl line 3: field 'rewards[0]'", "expected a number"),
         ("data.train_path={tmp}/prefs",), setup=_data_directory),
    # -- issue 27: the weak cases ---------------------------------------------------------------------
    Case("special-tokens-in-text-refused", ("{tmp}/data.jsonl", "line 2", "field 'responses[1]'", "'<|im_end|>'",
                                            "data.special_tokens_in_text=refuse"),
         ("data.special_tokens_in_text=refuse",),
         data=rows_with(1, lambda r: r["responses"].__setitem__(1, "ddd<|im_end|>"))),
    Case("yaml-duplicate-key", ("config file {tmp}/dup.yaml: key 'train' is given twice", "and line"),
         config="{tmp}/dup.yaml", setup=_duplicate_key_config),
    Case("max-length-fits-no-group", ("no usable groups", "no group fits data.max_length=8"),
         ("data.max_length=8",)),
    Case("json-file-of-one-object", ("{tmp}/one.json: holds one JSON object, not rows",),
         ("data.train_path={tmp}/one.json",), setup=_one_object_json),
    Case("config-is-a-directory", ("config file {tmp} is a directory",), config="{tmp}"),
    # -- issue 27: resuming checks what wrote the checkpoint; the first change named, the real cause --------
    Case("resume-other-loss", ("train.output_dir {tmp}/first holds a checkpoint of another run",
                               "loss.name: rao in the checkpoint, dpo now", "a new train.output_dir",
                               "checkpoint.resume=fresh", "checkpoint.allow_changed_run=true"),
         ("train.output_dir={tmp}/first", "loss.name=dpo", "loss.z0=null"), setup=_earlier_run),
    Case("resume-other-loss-tp2", ("holds a checkpoint of another run", "loss.name: rao in the checkpoint, dpo now"),
         ("train.output_dir={tmp}/first", "loss.name=dpo", "loss.z0=null", "parallel.tp=2"), world=2,
         setup=_earlier_run),
    Case("resume-other-task", ("train.task: policy in the checkpoint, rm now", "also changed: loss",
                               "checkpoint.resume=fresh"),
         ("train.output_dir={tmp}/first",), config=str(ROOT / "examples/configs/rm_tiny.yaml"),
         setup=_earlier_run),
    Case("resume-other-loss-setting", ("loss.beta: 0.1 in the checkpoint, 0.2 now",),
         ("train.output_dir={tmp}/first", "loss.beta=0.2"), setup=_earlier_run),
    Case("resume-other-global-batch", ("train.global_batch_groups: 4 in the checkpoint, 2 now",),
         ("train.output_dir={tmp}/first", "train.global_batch_groups=2"), setup=_earlier_run),
    Case("resume-other-initial-model", ("initial model: random init of tiny-llama, seed 1234 in the checkpoint, "
                                        "random init of tiny-llama, seed 7 now",),
         ("train.output_dir={tmp}/first", "train.seed=7"), setup=_earlier_run),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(tmp_path, case):
    sub = lambda s: s.replace("{tmp}", str(tmp_path))  # noqa: E731
    if case.data is not None:
        (tmp_path / "data.jsonl").write_text(case.data)
    if case.data_bytes is not None:
        (tmp_path / "data.jsonl").write_bytes(case.data_bytes)
    if case.setup:
        case.setup(tmp_path)
    out = tmp_path / "out"
    if case.argv is not None:
        argv = [sub(a) for a in case.argv]
    else:
        argv = ["--config", sub(case.config) if case.config else str(CONFIG), f"train.output_dir={out}",
                "train.steps=2"]
        if case.data is not None or case.data_bytes is not None:
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
    for path in case.absent:
        assert not Path(sub(path)).exists(), f"{sub(path)} was written"
    assert not list(tmp_path.rglob(".rao_write_probe_*")), "a write probe was left behind"


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("world", [1, 2])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_good_one(tmp_path, monkeypatch, world):
    """ENOSPC inside Megatron's checkpoint writer (the real writer, its OSError wrapped on the way up): one line
    naming the checkpoint and the cause, exit 2; ``latest`` still names the last good checkpoint, no .tmp left."""
    import errno
    import functools
    import os

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    real = filesystem_async._write_item

    @functools.wraps(real)  # Megatron passes the arguments its signature names
    def full_at_step_2(*args, **kwargs):
        if any("step_0000002.tmp" in str(getattr(a, "name", "")) for a in args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(filesystem_async, "_write_item", full_at_step_2)  # the forked ranks inherit it
    out = tmp_path / "out"
    argv = ["--config", str(CONFIG), f"train.output_dir={out}", "train.steps=3", "checkpoint.save_every=1",
            "train.eval_every=0", f"data.token_cache={tmp_path / 'tokens'}"]
    if world == 2:
        argv.append("train.global_batch_groups=4")
    result = tmp_path / "result.txt"
    run_distributed(run_cli_worker, world, "rao_megatron.cli.train", argv, str(result))
    code, err = result.read_text().split("\n", 1)
    lines = [line for line in err.splitlines()
             if line.strip() and not line.startswith(("note:", "warning:", "rao training"))]  # not the progress bar
    root = out / "checkpoints"
    assert code == "2", err
    assert lines == [f"error: checkpoint {root / 'step_0000002'}: cannot write: No space left on device"], err
    assert "Traceback" not in err
    assert (root / "latest").read_text().strip() == "step_0000001"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]
