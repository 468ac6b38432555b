"""Loss registry: a config name -> a documented loss with defaults, checks and a global normaliser.

A loss owns what the run needs to know about it, as optional hooks given to :func:`register`; the trainer and the
config call them through :class:`LossSpec` / :class:`BoundLoss` and name no loss:

- ``calibrate(stats, hparams, affine) -> hparams``: hyper-parameters derived from the training set's reward
  statistics (a :class:`~.calibration.RewardStats`), given the ones that were set and the reward normalisation
  ``(scale, shift)``; called once when the loss is bound with statistics (RAO: its ``log_z0``);
- ``startup_lines(bound, rewards) -> list[str]``: lines printed at start-up about the training set's raw rewards
  (per group; None when the data has none), after the normalisation's own line (RAO: its step-0 targets);
- ``watch(bound, step, record) -> str | None``: a warning from one step's metrics record, or None (RAO: log Z
  drifting from log_z0); the trainer prints a loss's first warning of a run only;
- ``exclusive``: groups of hyper-parameters of which at most one may be set (RAO: ``z0`` / ``log_z0``);
- ``needs_prompt_logps``: whether the loss reads the prompt log-probs P(x) (``policy_prompt_logps`` /
  ``ref_prompt_logps``), a bool or ``fn(settings) -> bool`` of its hyper-parameters (RAO: in its prefix modes of
  ``log_z``). Default False: the loss reads the responses' R(y) only, and the forward step sends only the response
  positions' hidden states to the output layer (P(x) is then None).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .calibration import RewardStats
from .stats import SequenceStats

#: fn(stats, **hparams) -> (per_group [G] loss contributions, weights [G], metrics: detached 0-d tensors)
LossTermsFn = Callable[..., tuple[Tensor, Tensor, dict[str, Tensor]]]
#: fn(reward statistics, the hyper-parameters set, normalisation (scale, shift)) -> hyper-parameters to bind
CalibrateFn = Callable[["RewardStats", dict[str, Any], tuple[float, float]], dict[str, Any]]
#: fn(bound loss, raw training rewards per group or None) -> start-up lines
StartupLinesFn = Callable[["BoundLoss", "Sequence[Sequence[float]] | None"], list[str]]
#: fn(bound loss, step, the step's metrics record) -> a warning line or None
WatchFn = Callable[["BoundLoss", int, dict[str, Any]], "str | None"]
#: fn(the loss's settings: defaults under the bound hyper-parameters) -> whether it reads P(x)
PromptNeedFn = Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class LossSpec:
    """One registered loss.

    Calling it returns ``(loss, metrics)``: ``loss = Σ_g per_group[g] / normalizer``, where the
    normaliser defaults to the local ``Σ_g weights[g]`` — the number of groups for every loss but
    ``sft`` (the number of response tokens). A training engine that splits a batch over micro-batches
    and data-parallel ranks passes the *global* normaliser so the summed result equals the loss of
    the whole batch (NeMo-RL's global-normalisation scheme).

    Metrics are detached 0-d tensors on the loss's device, never Python numbers: reading a value on the
    host is a device sync, so the training step reads all of its micro-batches' metrics at once
    (``training.reductions``). A metric with nothing to measure in a batch is NaN (its step average
    skips it).
    """

    name: str
    terms: LossTermsFn
    formula: str
    needs_reference: bool
    needs_rewards: bool
    pairwise: bool
    normalizer_kind: str = "groups"  # or "tokens"
    defaults: dict[str, Any] = field(default_factory=dict)
    calibrate: CalibrateFn | None = None
    startup_lines: StartupLinesFn | None = None
    watch: WatchFn | None = None
    exclusive: tuple[tuple[str, ...], ...] = ()
    needs_prompt_logps: bool | PromptNeedFn = False

    @property
    def hparams(self) -> tuple[str, ...]:
        """Names of the hyper-parameters this loss accepts."""
        return tuple(p for p in inspect.signature(self.terms).parameters if p != "stats")

    def check_hparams(self, hparams: dict[str, Any]) -> None:
        """Raise if a hyper-parameter is not one this loss accepts (names close matches)."""
        for key in hparams:
            if key not in self.hparams:
                close = difflib.get_close_matches(key, self.hparams, n=2)
                hint = f"; did you mean {' or '.join(close)}?" if close else ""
                raise ValueError(f"loss '{self.name}' has no hyper-parameter '{key}' "
                                 f"(it takes: {', '.join(self.hparams) or 'none'}){hint}")

    def normalizer(self, lengths: Tensor, group_ids: Tensor) -> float:
        """These sequences' share of the normaliser: their group count, or their response-token count."""
        if self.normalizer_kind == "tokens":
            return float(lengths.sum())
        return float(group_ids.unique().numel())

    def exclusive_clash(self, hparams: dict[str, Any]) -> tuple[str, ...] | None:
        """The first ``exclusive`` group of which more than one hyper-parameter is set (in ``hparams``, not None)."""
        for group in self.exclusive:
            given = tuple(k for k in group if hparams.get(k) is not None)
            if len(given) > 1:
                return given
        return None

    def bind(self, hparams: dict[str, Any], *, reward_affine: tuple[float, float] = (1.0, 0.0),
             reward_stats: RewardStats | None = None) -> BoundLoss:
        """This loss with checked hyper-parameters, built once per run and passed down; ``reward_affine``
        ``(scale, shift)`` maps every explicit reward first (the run's reward normalisation). With the training
        set's ``reward_stats``, the loss's ``calibrate`` hook adds the hyper-parameters it derives from them."""
        self.check_hparams(hparams)
        scale, shift = (float(x) for x in reward_affine)
        if not (scale > 0 and math.isfinite(scale) and math.isfinite(shift)):
            raise ValueError(f"reward normalisation must be an increasing affine map, got scale={scale}, shift={shift}")
        hparams = dict(hparams)
        if reward_stats is not None and self.calibrate is not None:
            hparams = dict(self.calibrate(reward_stats, hparams, (scale, shift)))
            self.check_hparams(hparams)
        return BoundLoss(self, hparams, (scale, shift))

    def __call__(self, stats: SequenceStats, *, normalizer: float | None = None,
                 **hparams: Any) -> tuple[Tensor, dict[str, Tensor]]:
        self.check_hparams(hparams)
        return self._apply(stats, normalizer, hparams)

    def _apply(self, stats: SequenceStats, normalizer: float | None,
               hparams: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        per_group, weights, metrics = self.terms(stats, **hparams)
        denom = weights.sum() if normalizer is None else normalizer
        if normalizer is not None and not normalizer > 0:
            raise ValueError(f"normalizer must be > 0, got {normalizer}")
        loss = per_group.sum() / denom
        metrics = {"loss": per_group.detach().sum() / weights.sum(), **metrics}
        return loss, metrics


@dataclass(frozen=True)
class BoundLoss:
    """A :class:`LossSpec` with its hyper-parameters, checked once: ``loss(stats, normalizer=N)``."""

    spec: LossSpec
    hparams: dict[str, Any]
    reward_affine: tuple[float, float] = (1.0, 0.0)

    @property
    def name(self) -> str:
        return self.spec.name

    def normalizer(self, lengths: Tensor, group_ids: Tensor) -> float:
        return self.spec.normalizer(lengths, group_ids)

    @property
    def settings(self) -> dict[str, Any]:
        """Every hyper-parameter as the loss sees it: its defaults under the ones bound."""
        return {**self.spec.defaults, **self.hparams}

    @property
    def needs_prompt_logps(self) -> bool:
        """Whether this loss, with these hyper-parameters, reads the prompt log-probs P(x) (else only R(y)): what
        the forward step sends to the output layer (the response positions, or the prompt's too)."""
        need = self.spec.needs_prompt_logps
        return bool(need(self.settings) if callable(need) else need)

    def normalized_rewards(self, rewards: Tensor) -> Tensor:
        """``rewards`` as the loss sees them (the run's normalisation applied)."""
        scale, shift = self.reward_affine
        return rewards if (scale, shift) == (1.0, 0.0) else rewards * scale + shift

    def startup_lines(self, rewards: Sequence[Sequence[float]] | None) -> list[str]:
        """The start-up lines on the training set's raw ``rewards`` (per group; None when the data has none): the
        normalisation, for a loss that uses reward values, then the loss's own (its ``startup_lines`` hook)."""
        lines = []
        if self.spec.needs_rewards and rewards:
            scale, shift = self.reward_affine
            lines.append(f"rewards: normalised by {scale:.6g}·r {shift + 0.0:+.6g} (loss.reward_normalization)")  # no "-0"
        if self.spec.startup_lines is not None:
            lines += self.spec.startup_lines(self, rewards)
        return lines

    def watch(self, step: int, record: dict[str, Any]) -> str | None:
        """A warning from this step's metrics ``record`` (the loss's ``watch`` hook), else None."""
        return None if self.spec.watch is None else self.spec.watch(self, step, record)

    def __call__(self, stats: SequenceStats, *, normalizer: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if stats.rewards is not None and self.reward_affine != (1.0, 0.0):
            stats = dataclasses.replace(stats, rewards=self.normalized_rewards(stats.rewards))
        return self.spec._apply(stats, normalizer, self.hparams)


LOSSES: dict[str, LossSpec] = {}


def register(name: str, *, formula: str, needs_reference: bool, needs_rewards: bool, pairwise: bool,
             normalizer_kind: str = "groups", calibrate: CalibrateFn | None = None,
             startup_lines: StartupLinesFn | None = None, watch: WatchFn | None = None,
             exclusive: Sequence[Sequence[str]] = (),
             needs_prompt_logps: bool | PromptNeedFn = False) -> Callable[[LossTermsFn], LossTermsFn]:
    """Decorator adding a loss-terms function to the registry under ``name``, with its optional hooks (the
    module's docstring)."""

    def wrap(fn: LossTermsFn) -> LossTermsFn:
        defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()
                    if k != "stats" and p.default is not inspect.Parameter.empty}
        groups = tuple(tuple(g) for g in exclusive)
        spec = LossSpec(name=name, terms=fn, formula=formula, needs_reference=needs_reference,
                        needs_rewards=needs_rewards, pairwise=pairwise, normalizer_kind=normalizer_kind,
                        defaults=defaults, calibrate=calibrate, startup_lines=startup_lines, watch=watch,
                        exclusive=groups, needs_prompt_logps=needs_prompt_logps)
        unknown = [k for g in groups for k in g if k not in spec.hparams]
        if unknown:
            raise ValueError(f"loss '{name}': exclusive names hyper-parameters it does not take: {', '.join(unknown)}")
        LOSSES[name] = spec
        return fn

    return wrap


def get_loss(name: str) -> LossSpec:
    """The loss registered as ``name``; an unknown name raises with the close matches."""
    if name not in LOSSES:
        close = difflib.get_close_matches(name, LOSSES, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"unknown loss '{name}' (known: {', '.join(sorted(LOSSES))}){hint}")
    return LOSSES[name]
