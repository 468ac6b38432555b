"""Config: YAML + dot-overrides, type/range/choice checks, unknown keys with close matches."""

from __future__ import annotations

import math

import pytest
import yaml

from rao_megatron.config import ConfigError, describe, dump_config, load_config


def write(tmp_path, data) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, {"loss": {"name": "dpo", "beta": 0.3}, "train": {"lr": "1e-6", "steps": 7},
                            "parallel": {"tp": 2}})
    cfg = load_config(path, ["loss.beta=0.1", "train.lr=5e-7", "parallel.pp=2", "model.dtype=bf16"])
    assert cfg.loss.name == "dpo" and cfg.loss.beta == 0.1
    assert cfg.train.lr == 5e-7 and cfg.train.steps == 7
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert cfg.model.dtype == "bf16"
    assert cfg.loss.hparams() == {"beta": 0.1}


def test_round_trip_dump(tmp_path):
    cfg = load_config(None, ["loss.z0=50", "train.steps=3", "parallel.vpp=2"])
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg
    assert math.isclose(cfg.loss.z0, 50.0)


@pytest.mark.parametrize("override,match", [
    ("train.lrr=1", r"unknown config key 'train.lrr'.*did you mean train.lr"),
    ("loss.gama=1", r"unknown config key 'loss.gama'.*did you mean loss.gamma"),
    ("trian.lr=1", r"unknown config section 'trian'.*did you mean train"),
    ("loss.beta=0", r"'loss.beta' .* must be > 0, got 0"),
    ("loss.beta=-0.5", r"'loss.beta' .* must be > 0"),
    ("loss.z0=0", r"'loss.z0' .* must be > 0"),
    ("loss.label_smoothing=0.5", r"'loss.label_smoothing' .* must be < 0.5"),
    ("parallel.tp=two", r"'parallel.tp' .* must be int, got 'two'"),
    ("parallel.tp=0", r"'parallel.tp' .* must be >= 1"),
    ("train.steps=1.5", r"'train.steps' .* must be int"),
    ("model.dtype=fp16", r"'model.dtype' .* must be one of fp32, bf16; got 'fp16'"),
    ("loss.name=dpp", r"'loss.name'.*unknown loss 'dpp'.*did you mean dpo"),
    ("train.lr=nan", r"'train.lr' .* must be finite"),
    ("train.lr", r"must look like section.key=value"),
    ("lr=1", r"unknown config section 'lr'"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_hparam_of_another_loss_is_rejected():
    with pytest.raises(ConfigError, match=r"'loss.gamma'.*loss 'rao' does not use it"):
        load_config(None, ["loss.gamma=1.0"])
    with pytest.raises(ConfigError, match="give one of the two"):
        load_config(None, ["loss.z0=50", "loss.log_z0=3.9"])


def test_task_and_loss_must_agree():
    with pytest.raises(ConfigError, match="train.task=rm trains with loss 'bt'"):
        load_config(None, ["train.task=rm"])
    assert load_config(None, ["train.task=rm", "loss.name=bt", "loss.margin=0.5"]).loss.margin == 0.5
    with pytest.raises(ConfigError, match="set train.task=rm"):
        load_config(None, ["loss.name=bt"])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = write(tmp_path, "loss: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    typo = write(tmp_path, {"loss": {"bta": 0.1}})
    with pytest.raises(ConfigError, match=rf"unknown config key 'loss.bta' in {typo}"):
        load_config(typo)


def test_yaml_scientific_notation_is_a_float(tmp_path):
    # YAML 1.1 reads 5e-7 (no dot) as a string; the config still takes it as a float
    assert load_config(write(tmp_path, "train:\n  lr: 5e-7\n")).train.lr == 5e-7


def test_describe_lists_every_key_with_help():
    text = describe()
    for key in ("loss.log_z0", "parallel.tp", "train.output_dir", "data.overlength", "checkpoint.keep_last"):
        section, name = key.split(".")
        assert f"  {name} = " in text
    assert "prefix normaliser" in text


def test_yaml_hparam_of_another_loss_is_dropped_when_the_loss_is_switched(tmp_path, capsys):
    path = write(tmp_path, {"loss": {"name": "rao", "z0": 50.0, "beta": 0.2}})
    cfg = load_config(path, ["loss.name=dpo"])
    assert cfg.loss.name == "dpo" and cfg.loss.z0 is None and cfg.loss.beta == 0.2
    assert "loss.z0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'loss.gamma' .*loss 'dpo' does not use it"):
        load_config(path, ["loss.name=dpo", "loss.gamma=1"])
