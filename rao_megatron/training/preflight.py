"""Start-up checks of a run, before any model is built or anything is written: output paths, the model's
vocabulary and layout against the tokenizer and the config. (The reference caches' checks -- fingerprints,
coverage of every sequence, the step-0 guard -- are :mod:`.reference`'s.)

Checks that touch shared storage (a write probe, hashing a checkpoint) run on global rank 0 only and
their outcome is broadcast (:func:`on_rank0`): every rank then raises the same error, which the CLI
prints once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from rao_megatron.config import Config, ConfigError, check_writable
from rao_megatron.losses import BoundLoss
from rao_megatron.losses.calibration import RewardStats
from rao_megatron.models.hf_config import ModelArch
from rao_megatron.parallel.startup import log0
from rao_megatron.training import run_data
from rao_megatron.training.reference_cache import ReferenceCacheError

T = TypeVar("T")
_SIMPLE = (ConfigError, ReferenceCacheError)


def on_rank0(fn: Callable[[], T]) -> T:
    """``fn()`` run on global rank 0 only; every rank returns its result or raises its error.

    One write probe or checkpoint hash per job instead of one per rank (thousands on a cluster). A
    :class:`ConfigError` / :class:`ReferenceCacheError` is raised as such on every rank; any other error
    as a RuntimeError naming rank 0's.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except Exception as e:  # noqa: BLE001 - every rank must leave the broadcast
            error = e
            box = [("error", type(e) if isinstance(e, _SIMPLE) else None, str(e))]
    dist.broadcast_object_list(box, src=0)
    status, *rest = box[0]
    if status == "ok":
        return rest[0]
    if error is not None:
        raise error
    kind, message = rest
    raise (kind or RuntimeError)(message if kind else f"rank 0 failed a start-up check: {message}")


def check_output_dir(cfg: Config) -> None:
    """``train.output_dir`` is a directory (or can be made) that takes new files."""
    on_rank0(lambda: check_writable(cfg.train.output_dir, "config key 'train.output_dir'"))


def check_cache_outputs(cfg: Config, paths: Sequence[Path]) -> None:
    """Every cache ``precompute_reference`` will write can be written (before anything is computed)."""
    hint = "; set data.reference_cache to a writable path (the held-out cache goes beside it)"

    def probe() -> None:
        for p in paths:
            check_writable(p, "reference cache", directory=False, hint=hint)

    on_rank0(probe)


def _divisors_both(a: int, b: int) -> str:
    return ", ".join(str(d) for d in range(1, math.gcd(a, b) + 1) if a % d == 0 and b % d == 0)


def check_model_fits(cfg: Config, tokenizer: Any, arch: ModelArch) -> None:
    """The tokenizer's ids fit the model's embedding, and the TP/PP/VPP layout divides the model.

    Both fail much later otherwise: an ``IndexError`` inside the embedding at the first forward, or a
    layout error on every rank while the model is built.
    """
    source = cfg.model.init_checkpoint or cfg.model.hf_config or f"preset {cfg.model.preset}"
    vocab = arch.vocab_size
    if len(tokenizer) > vocab:
        raise ConfigError(
            f"the tokenizer ({run_data.run_tokenizer_path(cfg) or 'the tiny test tokenizer'}) has {len(tokenizer)} "
            f"tokens but the model ({source}) has vocab_size={vocab}: ids >= {vocab} would index past its embedding; "
            "use the model's own tokenizer (config key 'model.tokenizer')")
    heads, groups, layers = arch.dims.num_heads, arch.dims.num_query_groups, arch.num_layers
    tp, pp, vpp = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp
    for name, value in (("num_attention_heads", heads), ("num_key_value_heads (query groups)", groups)):
        if value % tp:
            raise ConfigError(f"{name}={value} is not divisible by tp={tp} (config key 'parallel.tp'; the model "
                              f"{source} takes tp in: {_divisors_both(heads, groups)})")
    stages = pp * (vpp or 1)
    if layers % stages:
        key = "parallel.pp" if not vpp else "parallel.pp × parallel.vpp"
        raise ConfigError(f"num_hidden_layers={layers} is not divisible by {key}={stages} (the model {source})")


def warn_about_data(groups: run_data.RunGroups) -> None:
    """Duplicated rows and held-out groups that are training groups: warnings with counts."""
    for line in groups.warnings:
        log0(line)


def train_rewards(groups: run_data.RunGroups) -> list[list[float]] | None:
    """The training split's raw rewards, per group; None when the data has none."""
    if not groups.train or groups.train[0].rewards is None:
        return None
    return [g.rewards for g in groups.train]


def reward_calibration(cfg: Config, groups: run_data.RunGroups) -> None:
    """Fill ``loss.reward_stats`` from the training split (unless the config pins them): the statistics behind
    the reward normalisation and what the loss derives from them (its ``calibrate`` hook: RAO's ``log_z0``),
    computed once here and saved with the run."""
    if cfg.loss.reward_stats is None and (rewards := train_rewards(groups)) is not None:
        cfg.loss.reward_stats = RewardStats.from_groups(rewards).to_dict()


def calibration_lines(loss: BoundLoss, groups: run_data.RunGroups) -> list[str]:
    """The start-up lines on the training rewards the loss sees (``BoundLoss.startup_lines``): the normalisation,
    then the loss's own (RAO: the range of step-0 targets, with a warning when it leaves the sane band)."""
    return loss.startup_lines(train_rewards(groups))
