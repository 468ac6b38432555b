"""Start-up checks of user input: config files, output paths, and the reference cache's binding to content."""

from __future__ import annotations

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
    from rao_megatron.training.run_data import reference_fingerprints

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
