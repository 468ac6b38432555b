"""Start-up checks of a run, before any model is built or anything is written: output paths, the model's
vocabulary and layout against the tokenizer and the config, the reference caches (fingerprints and
coverage of every sequence), and the step-0 guard on a cached reference.

Checks that touch shared storage (a write probe, hashing a checkpoint) run on global rank 0 only and
their outcome is broadcast (:func:`on_rank0`): every rank then raises the same error, which the CLI
prints once.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from rao_megatron.config import Config, ConfigError, check_writable
from rao_megatron.parallel.startup import log0
from rao_megatron.training import run_data
from rao_megatron.training.reference_cache import (
    ReferenceCache,
    ReferenceCacheError,
    check_coverage,
    delta_check,
)

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


def check_model_fits(cfg: Config, tokenizer: Any, hf_config: Any) -> None:
    """The tokenizer's ids fit the model's embedding, and the TP/PP/VPP layout divides the model.

    Both fail much later otherwise: an ``IndexError`` inside the embedding at the first forward, or a
    layout error on every rank while the model is built.
    """
    source = cfg.model.init_checkpoint or cfg.model.hf_config or f"preset {cfg.model.preset}"
    vocab = getattr(hf_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(
            f"the tokenizer ({run_data.run_tokenizer_path(cfg) or 'the tiny test tokenizer'}) has {len(tokenizer)} "
            f"tokens but the model ({source}) has vocab_size={vocab}: ids >= {vocab} would index past its embedding; "
            "use the model's own tokenizer (config key 'model.tokenizer')")
    heads = getattr(hf_config, "num_attention_heads", None)
    layers = getattr(hf_config, "num_hidden_layers", None)
    if heads is None or layers is None:
        return
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
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


def reward_calibration(cfg: Config, groups: run_data.RunGroups) -> None:
    """Fill ``loss.reward_stats`` from the training split (unless the config pins them): the statistics behind
    the reward normalisation and RAO's ``log_z0``, computed once here and saved with the run."""
    from rao_megatron.losses.calibration import RewardStats

    if cfg.loss.reward_stats is None and groups.train and groups.train[0].rewards is not None:
        cfg.loss.reward_stats = RewardStats.from_groups([g.rewards for g in groups.train]).to_dict()


def calibration_lines(loss: Any, groups: run_data.RunGroups) -> list[str]:
    """The start-up lines on the rewards a loss sees: the normalisation, and for RAO the range of step-0
    targets Δ_R* = r/β − log_z0 over the training responses, with a warning when it leaves the sane band."""
    from rao_megatron.losses.calibration import SANE_TARGET_NATS, compose, target_range

    if not loss.spec.needs_rewards or not groups.train or groups.train[0].rewards is None:
        return []
    scale, shift = loss.reward_affine
    lines = [f"rewards: normalised by {scale:.6g}·r {shift + 0.0:+.6g} (loss.reward_normalization)"]  # no "-0"
    if loss.name != "rao":
        return lines
    h = _rao_settings(loss)
    beta, log_z0 = h["beta"], h["log_z0"]
    total_scale, total_shift = compose((scale, shift), h["reward_scale"], h["reward_shift"])
    t = target_range([g.rewards for g in groups.train], beta=beta, log_z0=log_z0, scale=total_scale,
                     shift=total_shift)
    lo, mean, hi = (round(x, 2) + 0.0 for x in (t.min, t.mean, t.max))  # + 0.0: never "-0.00"
    lines.append(f"RAO targets at step 0, Δ_R* = r/β − log_z0 (β {beta:g}, log_z0 {log_z0:.4g}): "
                 f"min {lo:+.2f} / mean {mean:+.2f} / max {hi:+.2f} nats over {t.responses} responses")
    if not t.sane:
        lines.append(f"warning: RAO asks for log-probability changes beyond ±{SANE_TARGET_NATS:g} nats, which no "
                     "fine-tuning run reaches; raise loss.beta, set loss.reward_normalization=minmax or zscore, or "
                     "change loss.log_z0 (docs/rao.md)")
    return lines


def _rao_settings(loss: Any) -> dict[str, Any]:
    """RAO's hyper-parameters as the loss sees them: its defaults under the ones set, ``log_z0`` resolved."""
    from rao_megatron.losses.rao import resolve_log_z0

    h = {**loss.spec.defaults, **loss.hparams}
    return {**h, "log_z0": resolve_log_z0(h["log_z0"], h["z0"])}


def log_z_drift_line(loss: Any, step: int, log_z: float | None) -> str | None:
    """During training: a warning when RAO's batch-mean log Z = log_z0 + sg(Δ_P) has moved more than
    ``LOG_Z_DRIFT_NATS`` from log_z0 (every target Δ_R* = r/β − log Z moves with it), else None."""
    from rao_megatron.losses.calibration import LOG_Z_DRIFT_NATS

    if loss.name != "rao" or log_z is None:
        return None
    h = _rao_settings(loss)
    log_z0 = h["log_z0"]
    if not h["prefix_consistency"] or abs(log_z - log_z0) <= LOG_Z_DRIFT_NATS:
        return None
    return (f"warning: step {step}: RAO's log Z has moved {log_z - log_z0:+.2f} nats from log_z0 {log_z0:.4g} "
            "(the prompt tokens' log-prob change, sg(Δ_P)), which moves every target by as much; "
            "loss.prefix_consistency=false holds it at log_z0 (docs/rao.md, \"Watch log_z\")")


def open_reference_caches(cfg: Config, tokenizer: Any, hf_config: Any,
                          groups: run_data.RunGroups) -> tuple[ReferenceCache | None, ReferenceCache | None]:
    """The run's (training, held-out) caches, checked against the run and covering every one of its
    sequences; ``(None, None)`` when the reference is computed on the fly."""
    train_path = run_data.reference_cache_path(cfg, cfg.data.train_path)
    if cfg.train.reference == "auto" and not train_path.exists():
        log0(f"no reference cache at {train_path}: computing reference log-probs on the fly")
        return None, None
    model = on_rank0(lambda: run_data.model_identity(cfg, hf_config))
    caches = []
    for data_path, file_groups in groups.files(cfg):
        heldout = data_path != cfg.data.train_path or len(caches) > 0
        path = run_data.reference_cache_path(cfg, data_path, heldout=heldout)
        expected, info = run_data.reference_fingerprints(cfg, tokenizer, model, file_groups)
        cache = ReferenceCache(path, expected, info, warn=log0)
        check_coverage(cache, run_data.file_sequences(file_groups, groups.where.get(data_path, {})), data_path,
                       note=log0)
        caches.append(cache)
    return caches[0], caches[-1]


@torch.no_grad()
def step0_reference_check(chunks: Any, batcher: Any, *, vocab_size: int, settings: Any) -> str:
    """Last guard of a cached reference: the policy at step 0 is the reference, so its log-probs of the
    first step's worth of training sequences must match the cache to rounding. Returns the log line;
    raises :class:`ReferenceCacheError` above the limit. Collective: every rank calls it."""
    from megatron.core import parallel_state as ps

    from rao_megatron.data import PAD_GROUP
    from rao_megatron.parallel.device import compute_device
    from rao_megatron.training.engine import sequence_logps

    count = max(1, getattr(batcher, "micro_batches_per_step", 1))
    microbatches = list(itertools.islice(batcher.iter_eval_microbatches(), count))
    sums = sequence_logps(chunks, microbatches, vocab_size=vocab_size, settings=settings)
    acc = torch.zeros(5, dtype=torch.float64)  # Σ|Δ_R|, Σ|Δ_P|, response tokens, prompt tokens, sequences
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        for mb, (p, r) in zip(microbatches, sums):
            real = mb["group_ids"] != PAD_GROUP
            delta_r = (r.detach().cpu().double() - mb["ref_logps"].double())[real].abs()
            delta_p = (p.detach().cpu().double() - mb["ref_prompt_logps"].double())[real].abs()
            prompt_tokens = (mb["seq_lengths"] - mb["lengths"] - 1)[real].clamp(min=0)
            acc += torch.stack([delta_r.sum(), delta_p.sum(), mb["lengths"][real].double().sum(),
                                prompt_tokens.double().sum(), real.double().sum()])
    if dist.is_initialized() and dist.get_world_size() > 1:
        total = acc.to(compute_device())
        dist.all_reduce(total)
        acc = total.cpu()
    d_r, d_p, tok_r, tok_p, n = acc.tolist()
    n = max(n, 1.0)
    mean_abs = {"R": d_r / n, "P": d_p / n}
    per_token = {"R": d_r / tok_r if tok_r else 0.0, "P": d_p / tok_p if tok_p else 0.0}
    return delta_check(mean_abs, per_token, int(acc[4].item()), batcher.reference.path)
