"""RAO: Reward Alignment Optimization (point-wise reward distillation with prefix consistency).

Paper Algorithm 1, with the choices of DESIGN §2:
    log Z_i = log_z0 + stopgrad(Δ_P(x_i))            prefix consistency (Eq. 6), Z_i detached
                                                     (prefix_consistency=False: log Z_i = log_z0, an ablation)
    r̂_ij    = β·Δ_R(y_ij) + β·log Z_i                  implicit reward
    L_i     = (1/K_i) Σ_j (r_ij − r̂_ij)²               point-wise MSE; batch loss = mean over groups
with Δ_R = R_θ(y) − R_ref(y), Δ_P = P_θ(x) − P_ref(x), and r = reward_scale·r_raw + reward_shift.

What a run needs to know about RAO comes with it, as the registry's hooks (docs/rao.md): ``log_z0`` derived from
the training set's rewards (:func:`calibrate`), the start-up line on the step-0 targets (:func:`startup_lines`)
and the warning when log Z drifts during training (:func:`watch_log_z`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import checks
from .calibration import LOG_Z_DRIFT_NATS, SANE_TARGET_NATS, RewardStats, auto_log_z0, compose, target_range
from .groups import Groups, best_index, group_max, group_mean, make_groups, masked_mean
from .registry import BoundLoss, get_loss, register
from .stats import SequenceStats

DEFAULT_LOG_Z0 = math.log(50.0)  # the paper's reported Z0 = 50 (with β = 0.1, lr 5e-7)


def resolve_log_z0(log_z0: float | None, z0: float | None) -> float:
    """``log_z0`` from either form; ``z0`` is the convenience spelling of ``exp(log_z0)``."""
    if z0 is not None and log_z0 is not None:
        raise ValueError("loss 'rao': give either z0 or log_z0, not both "
                         f"(got z0={z0!r}, log_z0={log_z0!r})")
    if z0 is not None:
        return math.log(checks.positive("rao", "z0", z0))
    if log_z0 is None:
        return DEFAULT_LOG_Z0
    return checks.finite("rao", "log_z0", log_z0)


#: ``loss.log_z``: how each group's log Z is set (docs/rao.md, "Where log Z comes from")
LOG_Z_MODES = ("prefix", "fixed", "sampled", "sampled_prefix")
#: the modes that add sg(Δ_P): the only ones that read the prompt log-probs P(x)
PREFIX_MODES = ("prefix", "sampled_prefix")


def log_z_mode(log_z: str | None, prefix_consistency: bool = True) -> str:
    """The ``log_z`` mode of a RAO setting: ``log_z`` when given, else the older spelling
    ``prefix_consistency`` (true: prefix, false: fixed)."""
    if log_z is None:
        return "prefix" if prefix_consistency else "fixed"
    if log_z not in LOG_Z_MODES:
        raise ValueError(f"loss 'rao': log_z must be one of {', '.join(LOG_Z_MODES)}, got {log_z!r}")
    return log_z


def needs_prompt_logps(h: dict[str, Any]) -> bool:
    """Whether RAO with settings ``h`` reads P(x): in the prefix modes of ``log_z`` only (the registry's
    ``needs_prompt_logps``; elsewhere the forward step computes no prompt log-probs)."""
    return log_z_mode(h.get("log_z"), bool(h.get("prefix_consistency", True))) in PREFIX_MODES


def sampled_log_z(targets: Tensor, beta: float, groups: Groups) -> Tensor:
    """``[G]``: each group's log Z estimated from its own responses, log-mean-exp_j(r_j/β) -- the paper's
    Z(x) = E_{y~π_ref}[exp(r(x, y)/β)] when the group's responses are samples of the reference model."""
    scaled = targets.detach() / beta
    top = group_max(scaled, groups.index, groups.count)
    return top + torch.log(group_mean(torch.exp(scaled - top[groups.index]), groups.index, groups.count))


def implicit_rewards(stats: SequenceStats, beta: float, log_z0: float, mode: str = "prefix",
                     groups: Groups | None = None, targets: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(r̂ [N], log Z [G])``: β·Δ_R + β·log Z_i. log Z_i by ``mode`` (:data:`LOG_Z_MODES`): ``prefix``
    log_z0 + sg(Δ_P), Δ_P averaged once per group (the paper's Eq. 6); ``fixed`` log_z0; ``sampled`` the
    group's log-mean-exp of ``targets``/β (:func:`sampled_log_z`); ``sampled_prefix`` that + sg(Δ_P).
    ``groups``: the batch's :func:`make_groups`, where the caller has it (computing it reads the group count
    on the host)."""
    groups = make_groups(stats.group_ids) if groups is None else groups
    delta_r = stats.policy_logps - stats.ref_logps
    if mode in ("sampled", "sampled_prefix"):
        if targets is None:
            raise ValueError("loss 'rao': log_z=sampled estimates log Z from the rewards; none were given")
        log_z = sampled_log_z(targets.to(delta_r.dtype), beta, groups)
    else:
        log_z = delta_r.new_full((groups.count,), float(log_z0))
    if mode in PREFIX_MODES:
        # Δ_P is identical for every response of a prompt (causal attention); averaging over the group
        # computes it once per group and absorbs rounding differences between the copies.
        log_z = log_z + group_mean((stats.policy_prompt_logps - stats.ref_prompt_logps).detach().to(delta_r.dtype),
                                   groups.index, groups.count)
    return beta * delta_r + beta * log_z[groups.index], log_z


def settings(hparams: dict[str, Any]) -> dict[str, Any]:
    """RAO's hyper-parameters as the loss sees them: its defaults under the ones set, ``log_z0`` resolved."""
    h = {**get_loss("rao").defaults, **hparams}
    return {**h, "log_z0": resolve_log_z0(h["log_z0"], h["z0"])}


def calibrate(stats: RewardStats, hparams: dict[str, Any], affine: tuple[float, float]) -> dict[str, Any]:
    """The hyper-parameters set, with ``log_z0`` derived from the training set's reward statistics
    (:func:`~.calibration.auto_log_z0`, after the normalisation ``affine`` and RAO's own reward_scale /
    reward_shift) when neither ``log_z0`` nor ``z0`` is set."""
    if hparams.get("log_z0") is not None or hparams.get("z0") is not None:
        return hparams
    h = {**get_loss("rao").defaults, **hparams}
    scale, shift = compose(affine, h["reward_scale"], h["reward_shift"])
    return {**hparams, "log_z0": auto_log_z0(stats, h["beta"], scale, shift)}


def startup_lines(loss: BoundLoss, rewards: Sequence[Sequence[float]] | None) -> list[str]:
    """The range of step-0 targets Δ_R* = r/β − log_z0 over the training responses, with a warning when it
    leaves the sane band (``SANE_TARGET_NATS``)."""
    if not rewards:
        return []
    h = settings(loss.hparams)
    beta, log_z0 = h["beta"], h["log_z0"]
    sampled = log_z_mode(h["log_z"], h["prefix_consistency"]).startswith("sampled")
    total_scale, total_shift = compose(loss.reward_affine, h["reward_scale"], h["reward_shift"])
    t = target_range(rewards, beta=beta, log_z0=log_z0, scale=total_scale, shift=total_shift, sampled=sampled)
    lo, mean, hi = (round(x, 2) + 0.0 for x in (t.min, t.mean, t.max))  # + 0.0: never "-0.00"
    where = ("r/β − log Z, log Z = each group's log-mean-exp of r/β (loss.log_z=sampled"
             f"{'_prefix' if h['log_z'] == 'sampled_prefix' else ''}; β {beta:g})" if sampled else
             f"r/β − log_z0 (β {beta:g}, log_z0 {log_z0:.4g})")
    lines = [f"RAO targets at step 0, Δ_R* = {where}: "
             f"min {lo:+.2f} / mean {mean:+.2f} / max {hi:+.2f} nats over {t.responses} responses"]
    if not t.sane:
        lines.append(f"warning: RAO asks for log-probability changes beyond ±{SANE_TARGET_NATS:g} nats, which no "
                     "fine-tuning run reaches; raise loss.beta, set loss.reward_normalization=minmax or zscore, or "
                     "change loss.log_z0 (docs/rao.md)")
    return lines


def watch_log_z(loss: BoundLoss, step: int, record: dict[str, Any]) -> str | None:
    """A warning when the step's batch-mean log Z = log_z0 + sg(Δ_P) (``record["log_z"]``; absent or None on a
    step without metrics) has moved more than ``LOG_Z_DRIFT_NATS`` from log_z0 (every target Δ_R* = r/β − log Z
    moves with it), else None."""
    log_z = record.get("log_z")
    if log_z is None:
        return None
    h = settings(loss.hparams)
    log_z0 = h["log_z0"]
    if log_z_mode(h["log_z"], h["prefix_consistency"]) != "prefix" or abs(log_z - log_z0) <= LOG_Z_DRIFT_NATS:
        return None  # the sampled modes' log Z is the data's own, per group: no log_z0 to drift from
    return (f"warning: step {step}: RAO's log Z has moved {log_z - log_z0:+.2f} nats from log_z0 {log_z0:.4g} "
            "(the prompt tokens' log-prob change, sg(Δ_P)), which moves every target by as much; "
            "loss.log_z=fixed holds it at log_z0 (docs/rao.md, \"Watch log_z\")")


@register("rao", formula="(1/K) Σ_j (r_j − β·Δ_R(y_j) − β·(log_z0 + sg(Δ_P(x))))²",
          needs_reference=True, needs_rewards=True, pairwise=False, calibrate=calibrate,
          startup_lines=startup_lines, watch=watch_log_z,
          exclusive=[("z0", "log_z0"), ("prefix_consistency", "log_z")], needs_prompt_logps=needs_prompt_logps)
def rao_terms(stats: SequenceStats, beta: float = 0.1, log_z0: float | None = None, z0: float | None = None,
              reward_scale: float = 1.0, reward_shift: float = 0.0,
              prefix_consistency: bool = True, log_z: str | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Per-group RAO losses ``[G]``, unit weights ``[G]`` and the metrics of DESIGN §2. ``log_z``
    (:data:`LOG_Z_MODES`, default prefix: the paper's Algorithm 1) sets each group's log Z; the older
    ``prefix_consistency=False`` is ``log_z=fixed`` (a constant log_z0; an ablation)."""
    beta = checks.positive("rao", "beta", beta)
    log_z0 = resolve_log_z0(log_z0, z0)
    reward_scale = checks.positive("rao", "reward_scale", reward_scale)
    reward_shift = checks.finite("rao", "reward_shift", reward_shift)
    mode = log_z_mode(log_z, bool(prefix_consistency))
    prompt = ("policy_prompt_logps", "ref_prompt_logps") if mode in PREFIX_MODES else ()
    stats.require("rao", "policy_logps", "ref_logps", *prompt, "rewards")
    groups = make_groups(stats.group_ids)
    target = stats.rewards.to(stats.policy_logps.dtype) * reward_scale + reward_shift
    r_hat, group_log_z = implicit_rewards(stats, beta, log_z0, mode, groups, target)
    residual = target - r_hat
    per_group = group_mean(residual.square(), groups.index, groups.count)
    return per_group, torch.ones_like(per_group), _metrics(stats, groups, r_hat.detach(), target,
                                                             residual.detach(), group_log_z)


def _metrics(stats: SequenceStats, groups: Groups, r_hat: Tensor, target: Tensor, residual: Tensor,
             log_z: Tensor) -> dict[str, Tensor]:
    """DESIGN §2's metrics, as detached 0-d tensors (read on the host once per step, not here).

    "Best" and "worst" only mean something where a group's rewards differ: in an all-tied group (every
    answer wrong, or K = 1) the first response would be "best" by convention and its target is set by
    β·log Z alone, so it would count as displaced by construction. Tied groups are reported on their own:
    ``tied_share`` (of the groups) and ``tied/delta_r`` (their mean Δ_R). A metric with nothing to measure
    in this batch (no group whose rewards differ, no tied group, no ordered pair) is NaN, which the step's
    average skips."""
    idx = groups.index
    delta_r = (stats.policy_logps - stats.ref_logps).detach()
    differs = group_max(target, idx, groups.count) > -group_max(-target, idx, groups.count)  # [G]
    best = best_index(groups, target)  # meaningful where ``differs``; masked below
    worst = best_index(groups, -target)
    ordered = (idx[:, None] == idx[None, :]) & (target[:, None] > target[None, :])
    return {
        "log_z": log_z.detach().mean(),
        "residual": residual.mean(),
        "tied_share": (~differs).float().mean(),
        "rewards/best": masked_mean(r_hat[best], differs),
        "rewards/worst": masked_mean(r_hat[worst], differs),
        "rewards/gap": masked_mean(r_hat[best] - r_hat[worst], differs),
        # likelihood displacement: the best response became less likely than under the reference
        "displacement": masked_mean((delta_r[best] < 0).float(), differs),
        "tied/delta_r": masked_mean(delta_r, ~differs[idx]),
        "ranking_accuracy": masked_mean((r_hat[:, None] > r_hat[None, :]).float(), ordered),
    }
