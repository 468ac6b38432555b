"""Start-up checks of user input: config files, output paths, and the reference cache's binding to content."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from rao_megatron.config import ConfigError, check_writable, load_config
from rao_megatron.training import reference_cache as rc
from rao_megatron.training.reference_cache import ReferenceCache, ReferenceCacheError

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples/configs/rao_tiny.yaml"


def read_only_dir(tmp_path: Path) -> Path:
    """A directory no file can be created in: chmod 555 for a normal user; root ignores modes, so /sys
    (which refuses new files) through a symlink."""
    d = tmp_path / "ro"
    if os.geteuid() != 0:
        d.mkdir()
        d.chmod(0o555)
        return d
    d.symlink_to("/sys")
    try:
        check_writable(d / "probe", "probe")
    except ConfigError:
        return d
    pytest.skip("no read-only location for root here")


# ---------------------------------------------------------------- config files

def test_yaml_errors_name_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 2\nloss: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value).startswith(f"config file {bad} is not valid YAML: line 4, column 1: ")
    bad.write_text("train:\n  steps: 2\n   lr: 1\n")
    with pytest.raises(ConfigError, match=r"line 3, column 6: mapping values are not allowed here"):
        load_config(bad)


def test_a_list_yaml_names_the_file_and_an_empty_section_is_accepted(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- train.steps=2\n- loss.beta=0.1\n")
    with pytest.raises(ConfigError, match=rf"config file in {listed} must be a mapping of keys.*got list"):
        load_config(listed)
    empty = tmp_path / "empty_section.yaml"
    empty.write_text("train:\n  steps: 7\ncheckpoint:\n  # save_every: 10\n  # keep_last: 3\n")
    cfg = load_config(empty)
    assert cfg.train.steps == 7 and cfg.checkpoint.keep_last == 2
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("checkpoint: 5\n")
    with pytest.raises(ConfigError, match=rf"config section 'checkpoint' in {scalar} must be a mapping"):
        load_config(scalar)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"train:\n  steps: \xff\xfe\n")
    with pytest.raises(ConfigError, match=rf"config file {binary} is not UTF-8 text"):
        load_config(binary)


# ---------------------------------------------------------------- output paths

def test_check_writable_refuses_files_and_read_only_places(tmp_path):
    check_writable(tmp_path / "new" / "deeper", "key")  # creatable: fine, and nothing is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"key: .*/f is a file, not a directory"):
        check_writable(tmp_path / "f", "key")
    with pytest.raises(ConfigError, match=r"key: .*/f/out cannot be created: .*/f is a file"):
        check_writable(tmp_path / "f" / "out", "key")
    with pytest.raises(ConfigError, match=r"cache: .* is a directory, not a file; hint"):
        check_writable(tmp_path, "cache", directory=False, hint="; hint")
    ro = read_only_dir(tmp_path)
    with pytest.raises(ConfigError, match=r"key: .*/ro/out is not writable: cannot create files in"):
        check_writable(ro / "out", "key")


# ---------------------------------------------------------------- the reference cache's identity

def _checkpoint(d: Path, weights: bytes) -> Path:
    d.mkdir(parents=True)
    (d / "rao_model.json").write_text('{"task": "policy"}')
    (d / "__0_0.distcp").write_bytes(weights)
    return d


def test_checkpoint_identity_is_content_not_path(tmp_path):
    big = bytes(range(256)) * (3 * rc.SMALL_FILE // 256)  # a "tensor file" above the whole-hash size
    a = rc.checkpoint_content_id(_checkpoint(tmp_path / "a", big))
    assert rc.checkpoint_content_id(_checkpoint(tmp_path / "moved" / "b", big)) == a  # moved: same content
    # another model of the same shape written in place (same names, same sizes): every weight differs
    (tmp_path / "a" / "__0_0.distcp").write_bytes(bytes((b + 1) % 256 for b in big))
    assert rc.checkpoint_content_id(tmp_path / "a") != a
    (tmp_path / "moved" / "b" / "rao_model.json").write_text('{"task": "policy", "step": 5}')
    assert rc.checkpoint_content_id(tmp_path / "moved" / "b") != a


def _groups(tok, rewards):
    from rao_megatron.data import tokenize_examples
    from rao_megatron.data.formats import Example

    ex = [Example(row=i + 1, where=f"line {i + 1}", prompt=[{"role": "user", "content": f"q{i}"}],
                  responses=["a", "bb"], rewards=list(r), reference_answer=None, kind="group")
          for i, r in enumerate(rewards)]
    return tokenize_examples(ex, tok, max_length=64)[0]


def _cfg(*overrides):
    return load_config(CONFIG, list(overrides))


def test_rewards_are_not_part_of_the_data_fingerprint():
    from rao_megatron.data import load_tokenizer
    from rao_megatron.training.reference import reference_fingerprints

    tok, cfg, model = load_tokenizer(None), _cfg(), ("m" * 32, "somewhere")
    fp, info = reference_fingerprints(cfg, tok, model, _groups(tok, [(1.0, 0.0), (0.5, 0.2)]))
    rescored, _ = reference_fingerprints(cfg, tok, model, _groups(tok, [(9.0, -3.0), (0.0, 7.0)]))
    assert fp == rescored
    assert fp["dtype"] == "fp32" and fp["logprob_precision"] == "fp32" and info["info_logprob_impl"] == "chunked"
    other, _ = reference_fingerprints(cfg, tok, model, _groups(tok, [(1.0, 0.0)]))
    assert other["data"] != fp["data"]


def _write(path, fp, keys, info=None, fmt=None):
    rc.write_cache(path, keys, [0.0] * len(keys), [0.0] * len(keys), fp, info or {})
    if fmt is not None:  # rewrite the header's format
        from safetensors.torch import load_file, save_file

        t = load_file(str(path))
        save_file(t, str(path), metadata={"format": fmt})


FP = {"data": "d" * 32, "tokenizer": "t", "max_length": "64", "overlength": "drop", "model": "m1", "dtype": "fp32",
      "logprob_precision": "fp32"}


@pytest.mark.parametrize("field, run_value, message", [
    ("model", "m2", "was computed for another model (model: cache 'm1' from /ckpt, run 'm2' from /ckpt)"),
    ("dtype", "bf16", "was computed for another model.dtype (dtype: cache 'fp32', run 'bf16')"),
    ("logprob_precision", "fp8", "another model.logprob_precision (logprob_precision: cache 'fp32', run 'fp8')"),
    ("tokenizer", "u", "another tokenizer (tokenizer: cache 't', run 'u')"),
])
def test_every_mismatch_is_one_line_naming_the_field_and_both_values(tmp_path, field, run_value, message):
    path = tmp_path / "c.safetensors"
    _write(path, FP, [1, 2], {"info_model_source": "/ckpt"})
    with pytest.raises(ReferenceCacheError) as info:
        ReferenceCache(path, {**FP, field: run_value}, {"info_model_source": "/ckpt"})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_old_caches_logprob_impl_and_coverage(tmp_path):
    path = tmp_path / "c.safetensors"
    _write(path, FP, [1, 2], fmt="rao_megatron.reference_logps/1")
    with pytest.raises(ReferenceCacheError, match=r"field 'format' differs: cache '.*/1', this version '.*/2'; it "
                                                  r"predates content-bound caches"):
        ReferenceCache(path, FP)
    _write(path, FP, [1, 2, 3], {"info_logprob_impl": "triton"})
    warnings: list[str] = []
    cache = ReferenceCache(path, FP, {"info_logprob_impl": "chunked"}, warn=warnings.append)
    assert len(warnings) == 1 and "model.logprob_impl=triton, this run uses chunked" in warnings[0]
    seqs = [(1, "line 1"), (2, "line 1"), (5, "line 4"), (6, "line 4"), (7, "line 9")]
    with pytest.raises(ReferenceCacheError, match=r"has no entry for 3 of 5 sequences of d\.jsonl, the first "
                                                  r"d\.jsonl line 4; recompute"):
        rc.check_coverage(cache, seqs, "d.jsonl")
    # computed for other data but covering every sequence (rows removed, rewards changed): used, with a note
    other = ReferenceCache(path, {**FP, "data": "e" * 32})
    notes: list[str] = []
    rc.check_coverage(other, seqs[:2], "d.jsonl", note=notes.append)
    assert len(notes) == 1 and "was computed for other data" in notes[0] and "using it" in notes[0]
    with pytest.raises(ReferenceCacheError, match=r"was computed for other data \(data: cache 'd+', run 'e+'\) and "
                                                  r"has no entry for 1 of 3"):
        rc.check_coverage(other, seqs[:3], "d.jsonl")


def test_step0_guard_threshold():
    line = rc.delta_check({"R": 1e-6, "P": 0.0}, {"R": 1e-8, "P": 0.0}, 16, "c.safetensors")
    assert line.startswith("reference check at step 0 (16 sequences, cache c.safetensors): mean |Δ_R| = 1e-06")
    with pytest.raises(ReferenceCacheError, match=r"does not match the initial model: .* mean \|Δ_P\| = 0\.5 nats per "
                                                  r"token, above 0\.02"):
        rc.delta_check({"R": 0.1, "P": 5.0}, {"R": 0.01, "P": 0.5}, 16, "c.safetensors")


# ---------------------------------------------------------------- issue 27: paths, writes, data, special tokens

DATA = ROOT / "examples/data/tiny_groups.jsonl"
ROWS = DATA.read_text().splitlines()


def test_home_and_variables_are_expanded_in_every_path_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAO_RUNS", str(tmp_path / "runs"))
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data:\n  train_path: ~/prefs.jsonl\ntrain:\n  output_dir: ${RAO_RUNS}/rao\n")
    cfg = load_config(yaml_file, ["model.tokenizer=~/tok", "checkpoint.resume=$RAO_RUNS/old", "data.eval_path=~"])
    assert cfg.data.train_path == f"{tmp_path}/home/prefs.jsonl"
    assert cfg.train.output_dir == f"{tmp_path}/runs/rao"
    assert cfg.model.tokenizer == f"{tmp_path}/home/tok" and cfg.checkpoint.resume == f"{tmp_path}/runs/old"
    assert cfg.data.eval_path is None  # a bare ~ is YAML's null, as before
    assert load_config(None, ["checkpoint.resume=auto"]).checkpoint.resume == "auto"
    assert load_config(None, ["loss.name=dpo"]).loss.name == "dpo"  # not a path key: left alone
    with pytest.raises(ConfigError, match=r"config key 'train.output_dir' \(command-line override\): environment "
                                          r"variable \$RAO_NOT_SET in '\$RAO_NOT_SET/run' is not set"):
        load_config(None, ["train.output_dir=$RAO_NOT_SET/run"])
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "c.yaml").write_text("train:\n  steps: 3\n")
    assert load_config("~/c.yaml").train.steps == 3  # the config path itself


def test_an_output_key_naming_an_input_is_refused(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(ROWS[0] + "\n")
    with pytest.raises(ConfigError, match=r"config keys 'data.reference_cache' and 'data.train_path' name the same "
                                          r"path .*d.jsonl: the run would write over its input"):
        load_config(None, [f"data.train_path={data}", f"data.reference_cache={tmp_path}/./d.jsonl"])
    (tmp_path / "link.jsonl").symlink_to(data)
    with pytest.raises(ConfigError, match=r"'train.output_dir' and 'data.train_path'"):
        load_config(None, [f"data.train_path={tmp_path / 'link.jsonl'}", f"train.output_dir={data}"])
    load_config(None, [f"data.train_path={data}", f"data.reference_cache={data}.ref.safetensors"])


def test_duplicate_yaml_keys_name_the_key_and_both_lines(tmp_path):
    c = tmp_path / "dup.yaml"
    c.write_text("train:\n  lr: 1.0e-6\n  steps: 3\nloss:\n  beta: 0.1\n  beta: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(c)
    assert str(info.value) == f"config file {c}: key 'loss.beta' is given twice (line 5 and line 6); keep one"
    c.write_text("train:\n  steps: 3\nloss:\n  beta: 0.1\ntrain:\n  lr: 1.0e-6\n")
    with pytest.raises(ConfigError, match=r"key 'train' is given twice \(line 1 and line 5\)"):
        load_config(c)
    c.write_text("base: &b {steps: 3}\n")  # anchors and aliases are no duplicates
    with pytest.raises(ConfigError, match="unknown config section 'base'"):
        load_config(c)


def test_config_given_a_directory_says_so(tmp_path):
    with pytest.raises(ConfigError, match=rf"config file {tmp_path} is a directory, not a YAML file"):
        load_config(tmp_path)


def _run_command(module: str, argv: list[str], capsys) -> tuple[int, str]:
    import importlib

    code = importlib.import_module(f"rao_megatron.cli.{module}").cli(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("module, argv, names", [
    ("annotate", ["--data", "{tmp}/pairs.jsonl", "--out", "{tmp}/./pairs.jsonl", "--reward-fn",
                  "rao_megatron.rewards.rule:letter_share"], ("--out", "--data")),
    ("annotate", ["--data", "{tmp}/pairs.jsonl.partial.jsonl", "--out", "{tmp}/pairs.jsonl", "--reward-fn",
                  "rao_megatron.rewards.rule:letter_share"], ("--out", "--data")),
    ("generate", ["--model", "{tmp}/m", "--prompts", "{tmp}/pairs.jsonl", "--out", "{tmp}/pairs.jsonl"],
     ("--out", "--prompts")),
    ("evaluate", ["--answers", "{tmp}/eval.json", "--out-dir", "{tmp}"], ("--out-dir", "--answers")),
    ("convert", ["hf-to-megatron", "--hf", "{tmp}", "--out", "{tmp}"], ("--out", "--hf")),
    ("convert", ["megatron-to-hf", "--megatron", "{tmp}/ckpt", "--out", "~/../{home}/ckpt"], ("--out", "--megatron")),
])
def test_no_command_writes_over_its_input(tmp_path, capsys, monkeypatch, module, argv, names):
    monkeypatch.setenv("HOME", str(tmp_path))
    row = '{"prompt": "Repeat the letter a.", "chosen": "aaa", "rejected": "b"}\n'  # scored fine: replaced before
    (tmp_path / "pairs.jsonl").write_text(row)
    (tmp_path / "pairs.jsonl.partial.jsonl").write_text(row)
    (tmp_path / "eval.json").write_text('[{"id": 1, "prompt": "q", "responses": ["a"]}]\n')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, err = _run_command(module, [a.replace("{tmp}", str(tmp_path)).replace("{home}", tmp_path.name)
                                      for a in argv], capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert f"{names[0]} " in err and f"is the same path as {names[1]} " in err and "never writes over its input" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing replaced, nothing added


def test_cli_path_options_expand_home_and_variables(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAO_OUT", str(tmp_path / "o"))
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q1", "chosen": "aaa", "rejected": "b"}\n')
    code, err = _run_command("annotate", ["--data", "~/pairs.jsonl", "--out", "$RAO_OUT/s.jsonl", "--no-progress",
                                          "--reward-fn", "rao_megatron.rewards.rule:letter_share"], capsys)
    assert (tmp_path / "o").is_dir() and not (tmp_path / "$RAO_OUT").exists() and not (tmp_path / "~").exists()
    code, err = _run_command("annotate", ["--data", "${RAO_UNSET_X}/p.jsonl", "--out", "s.jsonl", "--reward-fn",
                                          "rao_megatron.rewards.rule:letter_share"], capsys)
    assert code == 2 and err == "error: --data: environment variable $RAO_UNSET_X in '${RAO_UNSET_X}/p.jsonl' is not set"


def test_every_command_marks_its_path_options():
    """The rule is central (run_cli): each command's file and directory options are declared as paths."""
    import importlib

    from rao_megatron.cli.common import _path_actions

    expected = {"annotate": {"--data", "--out", "--reward-model", "--tokenizer"},
                "generate": {"--model", "--prompts", "--out"},
                "evaluate": {"--answers", "--reward-model", "--baseline", "--tokenizer", "--out-dir"},
                "convert": {"--hf", "--out", "--megatron"}, "train": {"--config"},
                "precompute_reference": {"--config"},
                "online": {"--config", "--prompts", "--hf", "--start", "--out", "--reward-model"},
                "demo": {"--out", "--hf", "--config"}}
    for module, options in expected.items():
        p = importlib.import_module(f"rao_megatron.cli.{module}").parser()
        assert {max(a.option_strings, key=len) for a in _path_actions(p)} == options, module


# -- failed writes: one line, the path and the cause; the last good output stays, the partial one goes

def _enospc() -> OSError:
    import errno

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _torch_write_error() -> RuntimeError:
    """torch.save's own form: a RuntimeError from its zip writer, the errno lost (torch.save to a path)."""
    return RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def test_write_failure_finds_the_cause_in_any_form(tmp_path, monkeypatch):
    import shutil

    import torch

    from rao_megatron.config import write_failure

    assert write_failure(_enospc(), tmp_path) == "No space left on device"
    f = open("/dev/full", "wb")  # a real one: torch's zip writer wraps the OSError of the stream
    with pytest.raises(RuntimeError) as info:
        torch.save(torch.zeros(100_000), f)
    with contextlib.suppress(OSError):
        f.close()
    assert "inline_container.cc" in str(info.value) and write_failure(info.value, tmp_path) == "No space left on device"
    rust = Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })')
    assert write_failure(rust, tmp_path) == "No space left on device"
    ranks = type("CheckpointException", (BaseException,), {})("write", {1: (RuntimeError("Worker failure"), None)})
    ranks.failures = {1: (_torch_write_error(), None)}
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=4096))
    assert write_failure(_torch_write_error(), tmp_path) == "No space left on device (0 MiB free)"
    assert write_failure(ranks, tmp_path) == "No space left on device (0 MiB free)"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1 << 40))
    assert write_failure(_torch_write_error(), tmp_path).startswith("the write failed ([enforce fail at inline_")
    # Megatron pickles each rank's failure (its cause is lost, its text kept); the other ranks get none
    pickled = type(ranks)("write", {0: (RuntimeError("Worker failure: [Errno 122] Disk quota exceeded"), None)})
    pickled.failures = {0: (RuntimeError("Worker failure: [Errno 122] Disk quota exceeded"), None)}
    assert write_failure(pickled, tmp_path) == "Disk quota exceeded"
    other = type(ranks)("write", {})
    other.failures = {}
    assert write_failure(other, tmp_path).startswith("another rank's write failed")
    bug = type(ranks)("write", {0: (TypeError("_write_item() missing 1 required positional argument"), None)})
    bug.failures = {0: (TypeError("_write_item() missing 1 required positional argument"), None)}
    assert write_failure(bug, tmp_path) is None  # a writer's bug is no failed write: raised as it is
    assert write_failure(ValueError("a bug"), tmp_path) is None
    assert write_failure(KeyError("x"), tmp_path) is None


def test_a_full_disk_during_a_model_checkpoint_keeps_the_last_one(tmp_path, monkeypatch):
    import shutil

    from rao_megatron.config import WriteError
    from rao_megatron.models import checkpoint as mc

    good = tmp_path / "ckpt"
    good.mkdir()
    (good / "rao_model.json").write_text('{"task": "policy"}')

    def full(state, directory, **kw):
        (Path(directory) / "__0_0.distcp").write_bytes(b"half")
        raise _torch_write_error()

    monkeypatch.setattr(mc.dist_checkpointing, "save", full)
    monkeypatch.setattr(mc, "model_sharded_state_dict", lambda chunks: {})
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=0))
    with pytest.raises(WriteError) as info:
        mc.save_model_checkpoint([], good, {"task": "policy"})
    assert str(info.value) == f"model checkpoint {good}: cannot write: No space left on device (0 MiB free)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the .tmp is gone
    assert [p.name for p in good.iterdir()] == ["rao_model.json"]


def test_a_full_disk_during_a_reference_cache_write_keeps_the_old_cache(tmp_path, monkeypatch):
    from rao_megatron.config import WriteError

    path = tmp_path / "c.safetensors"
    _write(path, FP, [1, 2])
    old = path.read_bytes()

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise _enospc()

    monkeypatch.setattr(rc, "save_file", full)
    with pytest.raises(WriteError, match=rf"^reference cache {path}: cannot write: No space left on device$"):
        _write(path, FP, [1, 2, 3])
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


def test_run_cli_prints_os_errors_as_one_line(tmp_path, capsys):
    import argparse

    from rao_megatron.cli.common import run_cli

    def main(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    assert run_cli(main, argparse.ArgumentParser(), []) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'x'}: Permission denied\n"


# -- data: directories through our reader, a .json of one object, special tokens, a max_length that fits nothing

def test_a_directory_of_jsonl_files_names_the_file_and_line_of_a_bad_row(tmp_path):
    from rao_megatron.data import DataError, read_examples

    d = tmp_path / "prefs"
    d.mkdir()
    (d / "a.jsonl").write_text("\n".join(ROWS[:2]) + "\n")
    (d / "b.jsonl").write_text(ROWS[2] + "\n" + ROWS[3].replace('"rewards": [', '"rewards": ["high", ') + "\n")
    with pytest.raises(DataError) as info:
        read_examples(d)
    assert str(info.value).startswith(f"{d}: b.jsonl line 2: field 'rewards'")
    (d / "b.jsonl").write_text(ROWS[2] + "\n{oops\n")
    with pytest.raises(DataError, match=rf"^{d}/b.jsonl: line 2: invalid JSON"):
        read_examples(d)
    (d / "b.jsonl").write_text(ROWS[2] + "\n")
    examples = read_examples(d)
    assert [(e.row, e.where) for e in examples] == [(0, "a.jsonl line 1"), (1, "a.jsonl line 2"),
                                                    (2, "b.jsonl line 1")]
    splits = tmp_path / "splits"  # `datasets`' split rules pick the files
    splits.mkdir()
    (splits / "train.jsonl").write_text(ROWS[0] + "\n")
    (splits / "test.jsonl").write_text(ROWS[1] + "\n" + ROWS[2] + "\n")
    assert len(read_examples(splits)) == 1 and len(read_examples(splits, split="test")) == 2
    with pytest.raises(DataError, match=r"no 'validation' split in the directory"):
        read_examples(splits, split="validation")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no data files in the directory"):
        read_examples(tmp_path / "empty")


def test_a_json_file_of_one_object_says_what_a_json_file_must_hold(tmp_path):
    import json

    from rao_megatron.data import DataError, read_examples

    f = tmp_path / "one.json"
    f.write_text(json.dumps(json.loads(ROWS[0]), indent=2))
    with pytest.raises(DataError, match=r"holds one JSON object, not rows: a .json data file must hold a list of "
                                        r"rows \(a JSON array\), or use JSONL"):
        read_examples(f)
    f.write_text("[" + ",".join(ROWS[:2]) + "]")
    assert len(read_examples(f)) == 2
    f.write_text(ROWS[0] + "\n")
    assert len(read_examples(f)) == 1  # one row on one line: JSONL in a .json file, as before


def _examples(*responses: str, prompt: str = "q"):
    from rao_megatron.data.formats import Example

    return [Example(row=i + 1, where=f"line {i + 1}", prompt=[{"role": "user", "content": prompt}],
                    responses=[y, "plain"], rewards=[1.0, 0.0], reference_answer=None, kind="group")
            for i, y in enumerate(responses)]


def test_special_tokens_in_text_are_counted_and_can_be_refused():
    from rao_megatron.data import DataError, load_tokenizer, tokenize_examples
    from rao_megatron.data.tokenize import check_special_tokens

    tok = load_tokenizer(None)
    _, report = tokenize_examples(_examples("fine", "stop<|im_end|>here", "also <|im_start|>"), tok, max_length=64,
                                  source="d.jsonl")
    assert report.special_token_rows == 2 and report.special_token_first == ["line 2", "responses[0]", "<|im_end|>"]
    assert ("  warning: 2 rows spell a special token of the tokenizer in their text, which becomes that control "
            "token (the first: line 2, field 'responses[0]', '<|im_end|>'); set data.special_tokens_in_text=refuse"
            ) in report.summary()
    check_special_tokens(report, "warn")
    with pytest.raises(DataError) as info:
        check_special_tokens(report, "refuse")
    assert str(info.value).startswith("d.jsonl: line 2: field 'responses[0]': spells the tokenizer's special token "
                                      "'<|im_end|>'")
    _, clean = tokenize_examples(_examples("fine", prompt="a <|im_end|"), tok, max_length=64)
    assert clean.special_token_rows == 0 and "warning" not in clean.summary()
    _, in_prompt = tokenize_examples(_examples("fine", prompt="<|pad|> hi"), tok, max_length=64)
    assert in_prompt.special_token_first == ["line 1", "prompt", "<|pad|>"]


def test_a_max_length_that_fits_no_group_names_data_max_length():
    from rao_megatron.data import load_tokenizer, tokenize_examples

    groups, report = tokenize_examples(_examples("a", "b"), load_tokenizer(None), max_length=8, source="d.jsonl")
    assert not groups
    assert "no group fits data.max_length=8 (prompt + response tokens); the shortest prompt alone is" in report.summary()
    _, fine = tokenize_examples(_examples("a"), load_tokenizer(None), max_length=64)
    assert "data.max_length" not in fine.summary()
