"""What a run reads: its tokenizer, its tokenized training / held-out groups, and where its reference cache is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rao_megatron.config import Config, ConfigError
from rao_megatron.training.model_init import model_dir


def run_tokenizer_path(cfg: Config) -> str | None:
    """``model.tokenizer``, else the HF model directory, else the initial checkpoint's; None: the tiny tokenizer."""
    path = cfg.model.tokenizer or model_dir(cfg)
    if path is None and cfg.model.init_checkpoint:
        from rao_megatron.models.checkpoint import checkpoint_tokenizer

        path = checkpoint_tokenizer(cfg.model.init_checkpoint)
    return str(Path(path).resolve()) if path is not None else None


def load_run_tokenizer(cfg: Config) -> Any:
    """The run's tokenizer (see :func:`run_tokenizer_path`)."""
    from rao_megatron.data.tokenizer import load_tokenizer

    return load_tokenizer(run_tokenizer_path(cfg))


@dataclass
class RunGroups:
    """Tokenized groups of a run: training, held-out, and which file each came from (for the cache)."""

    train: list[Any]
    heldout: list[Any]
    report: Any
    heldout_report: Any | None
    t0: int | None


def _tokenized(path: str, cfg: Config, tokenizer: Any, spec: Any, t0: int | None) -> tuple[list[Any], Any]:
    from rao_megatron.data import read_examples, tokenize_examples

    examples = read_examples(path, reward_field=cfg.data.ultrafeedback_rating)
    return tokenize_examples(
        examples, tokenizer, max_length=cfg.data.max_length, overlength=cfg.data.overlength,
        max_responses=cfg.data.max_responses, min_responses=2 if spec.pairwise else 1,
        drop_tied=spec.pairwise, t0=t0, source=path)


def load_groups(cfg: Config, tokenizer: Any, spec: Any) -> RunGroups:
    """Read, validate and tokenize the training data (and held-out data); report what was dropped."""
    from rao_megatron.data import split_heldout

    if not cfg.data.train_path:
        raise ConfigError("config key 'data.train_path' is not set: give a JSONL/Parquet file or a dataset")
    groups, report = _tokenized(cfg.data.train_path, cfg, tokenizer, spec, None)
    if not groups:
        raise ConfigError(f"no usable groups in {cfg.data.train_path}: "
                          + "; ".join(line.strip() for line in report.summary().splitlines()))
    if spec.needs_rewards and groups[0].rewards is None:
        raise ConfigError(f"loss '{spec.name}' needs rewards, but {cfg.data.train_path} has none "
                          "(annotate it: python -m rao_megatron.cli.annotate)")
    t0 = report.t0
    if cfg.data.eval_path:
        heldout, heldout_report = _tokenized(cfg.data.eval_path, cfg, tokenizer, spec, t0)
        return RunGroups(groups, heldout, report, heldout_report, t0)
    train, heldout = split_heldout(groups, cfg.data.eval_fraction, cfg.data.seed)
    return RunGroups(train, heldout, report, None, t0)


def reference_fingerprints(cfg: Config, tokenizer: Any, data_path: str) -> dict[str, str]:
    """What a reference cache must agree with: data, tokenizer, length policy and the reference model."""
    from rao_megatron.training.reference_cache import cache_fingerprints

    fp = cache_fingerprints(data_path=data_path, tokenizer=tokenizer, max_length=cfg.data.max_length,
                            overlength=cfg.data.overlength)
    if cfg.model.init_checkpoint:
        fp["model"] = f"checkpoint:{Path(cfg.model.init_checkpoint).resolve()}"
    else:
        fp["model"] = f"random:{cfg.model.hf_config or cfg.model.preset}:seed={cfg.train.seed}"
    return fp


def reference_cache_path(cfg: Config, data_path: str, *, heldout: bool = False) -> Path:
    """``data.reference_cache`` (training file) or the default path beside the data file."""
    from rao_megatron.training.reference_cache import default_cache_path

    if cfg.data.reference_cache and not heldout:
        return Path(cfg.data.reference_cache)
    return default_cache_path(data_path)
