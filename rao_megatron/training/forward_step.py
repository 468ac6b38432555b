"""Forward-step functions for ``megatron.core.pipeline_parallel.get_forward_backward_func()``.

Each step takes ``(data_iterator, model)``, runs the model on one micro-batch (a dict from
:func:`rao_megatron.data.collate_sequences`) and returns ``(output, loss_func)``; Megatron calls
``loss_func(output)`` on the last pipeline stage only.

Normalisation: a loss returns Σ_(groups in this micro-batch) ℓ_g / N, with N the *global* normaliser
(groups — or response tokens for SFT — in the whole optimizer step, over every micro-batch and
data-parallel rank). Megatron divides the returned loss by the number of micro-batches M and
Megatron DDP averages gradients over the D data-parallel ranks, so the tensor handed back for
backward is multiplied by ``grad_scale = M·D``; the summed gradient is then exactly that of the
whole-batch loss, whatever TP, PP, DP or the micro-batch split.

Loss positions: only the hidden states of the positions whose log-probs the loss reads reach the output
layer (:func:`position_sums`): the responses' label positions, and the prompt's where the loss reads P(x)
(``BoundLoss.needs_prompt_logps``: RAO's prefix modes of ``log_z``); the forward-only :class:`LogprobStep`
(reference log-probs, the cache) computes both. The collate functions list those positions on the host
(``prompt_positions`` / ``response_positions``), so the gather costs no host sync; the gradient reaches the
gathered rows only (autograd scatters it back). ``all_positions=True`` runs the output layer on every position,
as before #31 (the equivalence tests compare both).

Host syncs: a loss step reads one thing on the host per micro-batch, which sequences of it are real
(:func:`_real_sequences`; the losses themselves read their groups and pairs). Everything it returns for
the step's record (loss, metrics, group and pair counts) stays a 0-d tensor on the device;
:mod:`rao_megatron.training.reductions` reads a whole step's values at once. (A micro-batch built without the
collate functions' position lists costs one more per mask it needs: :func:`loss_positions`.)
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from rao_megatron.data.collate import PAD_GROUP
from rao_megatron.data.packing import is_packed, packed_attention_mask
from rao_megatron.logprobs import vocab_parallel_logprobs
from rao_megatron.losses import BoundLoss, SequenceStats
from rao_megatron.losses.groups import make_groups, preference_pairs
from rao_megatron.models.provider import output_weight, rope_at_positions, unwrap_model, uses_thd
from rao_megatron.models.reward import reward_scores
from rao_megatron.parallel.compat import gpt_forward_takes_padding_mask


@dataclass
class LogprobSettings:
    """How per-token log-probs are computed from the final hidden states (see ``rao_megatron.logprobs``)."""

    impl: str = "chunked"
    precision: str = "fp32"
    chunk_size: int | None = None


def head_logprobs(model: torch.nn.Module, hidden: Tensor, labels: Tensor, *, vocab_size: int,
                  settings: LogprobSettings) -> Tensor:
    """Per-token log-probs ``[T]`` (0 at ignored labels) from hidden ``[T, H]`` (TP-replicated, as the
    output layer's input) and this rank's vocab shard."""
    tp = ps.get_tensor_model_parallel_world_size()
    return vocab_parallel_logprobs(
        hidden, output_weight(model), labels, tp_group=ps.get_tensor_model_parallel_group() if tp > 1 else None,
        vocab_size=vocab_size, chunk_size=settings.chunk_size, impl=settings.impl, precision=settings.precision)


def token_logprobs(model: torch.nn.Module, hidden: Tensor, labels: Tensor, *, vocab_size: int,
                   settings: LogprobSettings) -> Tensor:
    """Per-token log-probs ``[B, S]`` (0 at ignored labels) from hidden ``[B, S, H]``: every position."""
    b, s, h = hidden.shape
    logps = head_logprobs(model, hidden.reshape(b * s, h), labels.reshape(b * s), vocab_size=vocab_size,
                          settings=settings)
    return logps.view(b, s)


def loss_positions(batch: dict[str, Tensor], part: str) -> Tensor:
    """Flat indices ``[T]`` (into ``[rows * seq_length]``, ascending) of the ``part`` ("prompt" or "response")
    label positions: the collate functions' ``<part>_positions``, else read from ``<part>_mask`` (a
    ``nonzero``: one host sync, for a micro-batch built by hand)."""
    key = f"{part}_positions"
    if key in batch:
        return batch[key]
    return torch.nonzero(batch[f"{part}_mask"].reshape(-1)).reshape(-1)


def position_sums(model: torch.nn.Module, hidden: Tensor, batch: dict[str, Tensor], *, prompts: bool,
                  vocab_size: int, settings: LogprobSettings) -> tuple[Tensor | None, Tensor]:
    """``(P(x) [N] or None, R(y) [N])`` as :func:`sequence_sums` gives them, with only the loss positions'
    hidden states sent to the output layer: the response positions, and the prompt's when ``prompts``
    (else P(x) is None). N: rows (padded) or packed sequences.

    The gather indexes ``hidden`` ``[B, S, H]`` (last stage; under sequence parallelism already gathered over
    the TP ranks, which all hold the same batch and so gather the same rows) by precomputed positions: no host
    sync, and in backward only the gathered rows get a gradient.
    """
    b, s, _ = hidden.shape
    parts = [_entries(batch, "prompt"), _entries(batch, "response")] if prompts else [_entries(batch, "response")]
    index, targets, sequence = (torch.cat(column) for column in zip(*parts))
    split = index.shape[0] - parts[-1][0].shape[0]  # shapes, known on the host
    if index.numel() == 0:  # an all-padding micro-batch: nothing reaches the output layer
        logps = hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
    else:  # flat indices: the same rows whether hidden is [rows, S, H] or one THD sequence [1, rows·S, H]
        logps = head_logprobs(model, hidden.reshape(b * s, -1)[index], targets, vocab_size=vocab_size,
                              settings=settings)
    n = batch["lengths"].shape[0] if is_packed(batch) else batch["labels"].shape[0]

    def per_sequence(lo: int, hi: int) -> Tensor:
        return logps.new_zeros(n).index_add(0, sequence[lo:hi], logps[lo:hi])

    prompt = None
    if prompts:  # a shared prompt's entries count for its group's first sequence; every member reads them
        prompt = per_sequence(0, split)
        prompt = prompt[batch["prompt_source"]] if "prompt_source" in batch else prompt
    return prompt, per_sequence(split, index.shape[0])


def _entries(batch: dict[str, Tensor], part: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(flat positions, target tokens, sequence numbers)`` of the ``part`` loss entries: a packed batch lists
    all three (:func:`~rao_megatron.data.packing.collate_packed`); a padded one its positions, the targets
    and sequences following from the labels and the row."""
    positions = loss_positions(batch, part)
    if f"{part}_targets" in batch:
        return positions, batch[f"{part}_targets"], batch[f"{part}_sequences"]
    return positions, batch["labels"].reshape(-1)[positions], positions // batch["labels"].shape[1]


def sequence_sums(token_logps: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(P(x) [N], R(y) [N])``: prompt-after-t0 and response sums of per-token log-probs, per sequence.

    Padded batches hold one sequence per row (N = rows); packed ones sum each sequence's segment.
    """
    if not is_packed(batch):
        return (token_logps * batch["prompt_mask"]).sum(dim=1), (token_logps * batch["response_mask"]).sum(dim=1)
    segments = batch["segment_ids"].reshape(-1)
    flat = token_logps.reshape(-1)
    n = batch["lengths"].shape[0]
    # padding tokens (segment -1) go to a spare slot n, dropped after: no boolean selection, whose size
    # the host would have to read (a device sync)
    slot = torch.where(segments >= 0, segments, n)

    def per_sequence(mask: Tensor) -> Tensor:
        return flat.new_zeros(n + 1).index_add(0, slot, flat * mask.reshape(-1))[:n]

    return per_sequence(batch["prompt_mask"]), per_sequence(batch["response_mask"])


def last_token_values(values: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Per-sequence ``[N]`` values at each sequence's last token, from ``values[B, S(, 1)]``."""
    if is_packed(batch):
        return values.reshape(-1)[batch["last_index"]]
    return reward_scores(values, lengths=batch["seq_lengths"])


def _optional(batch: dict[str, Tensor], name: str, real: Tensor) -> Tensor | None:
    return batch[name][real] if name in batch else None


def _real_sequences(batch: dict[str, Tensor]) -> Tensor:
    """Indices ``[n]`` of the micro-batch's real sequences (padding rows have group id ``PAD_GROUP``).

    The loss step's one host sync of its own: the losses take per-sequence tensors of the real sequences
    only, so their number must be known on the host; every selection indexes with these indices, which
    costs no further sync (a boolean mask would cost one per selection).
    """
    return torch.nonzero(batch["group_ids"] != PAD_GROUP).squeeze(1)


def _count_distinct(ids: Tensor) -> Tensor:
    """The number of distinct values of a non-empty 1-D tensor, as a 0-d tensor (``unique`` would sync)."""
    ordered = ids.sort().values
    return (ordered[1:] != ordered[:-1]).sum() + 1


def padding_mask(batch: dict[str, Tensor]) -> Tensor:
    """``[rows, seq_length]`` bool, True at padding: packed rows' tails and padding rows (megatron-core's
    ``padding_mask`` convention). An all-padding micro-batch gets an all-False mask: with every token
    excluded the router's load-balancing loss would be 0/0, so there it counts the padding, as before."""
    tokens = batch["tokens"]
    if is_packed(batch):
        real = batch["segment_ids"] >= 0
    else:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        real = (positions[None, :] < batch["seq_lengths"][:, None]) & (batch["group_ids"] != PAD_GROUP)[:, None]
    return ~real & real.any()


def _moe_padding_kwargs(model: torch.nn.Module, batch: dict[str, Tensor], flat: bool) -> dict[str, Tensor]:
    """``{"padding_mask": ...}`` for an MoE model, so that its routers' load-balancing loss counts real
    tokens only; ``{}`` for a dense model or a megatron-core whose ``GPTModel.forward`` has no such argument
    (it would count padding tokens: ``parallel.compat.gpt_forward_takes_padding_mask``)."""
    bare = unwrap_model(model)
    if not getattr(bare.config, "num_moe_experts", None) or not gpt_forward_takes_padding_mask():
        return {}
    mask = padding_mask(batch)
    if flat:  # THD: the rows run as one sequence
        mask = mask.reshape(1, -1)
    if not getattr(bare, "pre_process", True) and getattr(bare.config, "sequence_parallel", False):
        # Megatron splits the mask over the sequence-parallel ranks only on the stage that embeds the tokens;
        # a later pipeline stage holds this TP rank's s / tp positions and needs that part of the mask
        tp = ps.get_tensor_model_parallel_world_size()
        mask = mask.chunk(tp, dim=1)[ps.get_tensor_model_parallel_rank()].contiguous()
    return {"padding_mask": mask}


def _forward(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The model on one micro-batch: causal rows (padded), or packed rows with sequences kept apart.

    Packed: with Transformer Engine the rows are flattened to one THD sequence with ``cu_seqlens`` (TE's
    fused attention never looks across a boundary); the local spec gets an explicit block-diagonal mask.
    MoE models also get the padding mask, so that padding tokens do not count in the load-balancing loss.
    """
    if not is_packed(batch):
        return model(batch["tokens"], batch["position_ids"], None, **_moe_padding_kwargs(model, batch, False))
    if uses_thd(model):
        if batch.get("shared_prompts"):
            raise ValueError("the shared-prompt layout needs an attention mask, which Transformer Engine's THD "
                             "attention does not take; set data.shared_prompt=false")
        rows, seq_length = batch["tokens"].shape
        cu, longest = batch["cu_seqlens"], int(batch["max_seqlen"])
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                                 max_seqlen_kv=longest)
        out = model(batch["tokens"].reshape(1, -1), batch["position_ids"].reshape(1, -1), None,
                    packed_seq_params=params, **_moe_padding_kwargs(model, batch, True))
        # the last stage returns [1, rows * seq_length, *]; earlier stages hand their activations on as they are
        return out.reshape(rows, seq_length, *out.shape[2:]) if unwrap_model(model).post_process else out
    mask = packed_attention_mask(batch["segment_ids"], batch.get("prefix_ids"))
    # shared prompts: a response's positions continue from its prompt, not from its place in the row
    positions = rope_at_positions(model, batch["position_ids"]) if batch.get("shared_prompts") else nullcontext()
    with positions:
        return model(batch["tokens"], batch["position_ids"], mask, **_moe_padding_kwargs(model, batch, False))


@dataclass
class _LossStep:
    """Shared plumbing: the bound loss (checked once by its builder), the global normaliser, the grad scale."""

    loss: BoundLoss
    normalizer: float | None = None
    grad_scale: float = 1.0

    def _empty(self, output: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """An all-padding micro-batch (a DP rank's share of a short held-out set): no loss, no metrics."""
        zero = output.sum() * 0.0  # keeps the graph connected for a backward pass
        return zero, {"loss": zero.detach(), "metrics": {}, "groups": 0, "sequences": 0}

    def _finish(self, stats: SequenceStats) -> tuple[Tensor, dict[str, Any]]:
        """The loss for backward and the reduced outputs: loss, metrics and group count stay on the device."""
        loss, metrics = self.loss(stats, normalizer=self.normalizer)
        reduced = {"loss": loss.detach().clone(), "metrics": metrics,
                   "groups": _count_distinct(stats.group_ids), "sequences": stats.num_sequences}
        return loss * self.grad_scale, reduced


def _logp_sums(model: torch.nn.Module, hidden: Tensor, batch: dict[str, Tensor], vocab_size: int,
               settings: LogprobSettings, *, prompts: bool = True,
               all_positions: bool = False) -> tuple[Tensor | None, Tensor]:
    """Per-sequence (prompt after t0 — None unless ``prompts`` —, response) sums of token log-probs from the
    output layer: on the loss positions only (:func:`position_sums`), or with ``all_positions`` on every
    position, masked after (the path before #31; it computes P(x) whatever ``prompts``)."""
    model = unwrap_model(model)
    if all_positions and batch.get("shared_prompts"):
        raise ValueError("all_positions reads per-position masks, which a shared prompt's last token (predicting "
                         "every response's first) does not fit; use the loss positions")
    if all_positions:
        lp = token_logprobs(model, hidden, batch["labels"], vocab_size=vocab_size, settings=settings)
        return sequence_sums(lp, batch)
    return position_sums(model, hidden, batch, prompts=prompts, vocab_size=vocab_size, settings=settings)


@dataclass
class PolicyStep(_LossStep):
    """Policy training with any registry loss (and SFT): hidden states -> log-prob sums -> loss.

    Reference log-probs come from the batch (``ref_logps`` / ``ref_prompt_logps``: the precomputed
    cache, or a forward-only pass of a reference model on the same micro-batches). Only the positions the loss
    reads reach the output layer (module docstring); ``all_positions`` runs it on every position (before #31).
    """

    vocab_size: int = 0
    logprobs: LogprobSettings = field(default_factory=LogprobSettings)
    all_positions: bool = False

    def __call__(self, data_iterator: Any, model: torch.nn.Module) -> tuple[Tensor, Any]:
        batch = next(data_iterator)
        return _forward(model, batch), partial(self.loss_func, batch, model)

    def loss_func(self, batch: dict[str, Tensor], model: torch.nn.Module,
                  hidden: Tensor) -> tuple[Tensor, dict[str, Any]]:
        prompt, response = _logp_sums(model, hidden, batch, self.vocab_size, self.logprobs,
                                      prompts=self.loss.needs_prompt_logps, all_positions=self.all_positions)
        real = _real_sequences(batch)
        if real.numel() == 0:
            loss, reduced = self._empty(hidden)
        else:
            stats = SequenceStats(
                policy_logps=response[real], policy_prompt_logps=None if prompt is None else prompt[real],
                ref_logps=_optional(batch, "ref_logps", real),
                ref_prompt_logps=_optional(batch, "ref_prompt_logps", real),
                lengths=batch["lengths"][real], group_ids=batch["group_ids"][real],
                rewards=_optional(batch, "rewards", real),
                is_reference_answer=_optional(batch, "is_reference_answer", real))
            if self.loss.spec.needs_reference and stats.ref_logps is None:
                raise ValueError(f"loss '{self.loss.name}' needs reference log-probs: precompute them "
                                 "(python -m rao_megatron.cli.precompute_reference) or use train.reference=on_the_fly")
            loss, reduced = self._finish(stats)
        reduced["policy_logps"] = response[real].detach()
        return loss, reduced


@dataclass
class RewardModelStep(_LossStep):
    """Bradley–Terry reward-model training: scalar score at each sequence's last token -> ``bt`` loss."""

    def __call__(self, data_iterator: Any, model: torch.nn.Module) -> tuple[Tensor, Any]:
        batch = next(data_iterator)
        return _forward(model, batch), partial(self.loss_func, batch)

    def loss_func(self, batch: dict[str, Tensor], values: Tensor) -> tuple[Tensor, dict[str, Any]]:
        scores = last_token_values(values.float(), batch)
        real = _real_sequences(batch)
        if real.numel() == 0:
            loss, reduced = self._empty(values)
            reduced.update(scores=scores[real].detach(), pair_counts=(0, 0))
            return loss, reduced
        stats = SequenceStats(policy_logps=None, scores=scores[real], lengths=batch["lengths"][real],
                              group_ids=batch["group_ids"][real], rewards=_optional(batch, "rewards", real))
        loss, reduced = self._finish(stats)
        reduced["scores"] = scores[real].detach()
        reduced["pair_counts"] = self._pair_counts(stats)
        return loss, reduced

    def _pair_counts(self, stats: SequenceStats) -> tuple[Tensor, int]:
        """(correctly ordered, all) preference pairs of this micro-batch: exact held-out pair accuracy
        (the first a 0-d tensor, read on the host with the step's other values)."""
        chosen, rejected = preference_pairs(make_groups(stats.group_ids), stats.rewards,
                                            self.loss.hparams.get("pairing", "best_vs_rest"), self.loss.name)
        s = stats.scores.detach()
        return (s[chosen] > s[rejected]).sum(), int(chosen.numel())


@dataclass
class LogprobStep:
    """Forward only: per-sequence ``prompt_logps`` P(x) and ``response_logps`` R(y) (reference cache): both
    whatever the loss, so a cache serves every loss; the output layer sees the prompt and response positions
    only (``all_positions``: every position, before #31)."""

    vocab_size: int
    logprobs: LogprobSettings = field(default_factory=LogprobSettings)
    all_positions: bool = False

    def __call__(self, data_iterator: Any, model: torch.nn.Module) -> tuple[Tensor, Any]:
        batch = next(data_iterator)
        return _forward(model, batch), partial(self.loss_func, batch, model)

    def loss_func(self, batch: dict[str, Tensor], model: torch.nn.Module,
                  hidden: Tensor) -> tuple[Tensor, dict[str, Any]]:
        prompt, response = _logp_sums(model, hidden, batch, self.vocab_size, self.logprobs,
                                      all_positions=self.all_positions)
        return hidden.new_zeros(()), {"prompt_logps": prompt.detach(), "response_logps": response.detach()}


@dataclass
class ScoreStep:
    """Forward only: reward-model scores ``[B]`` at each sequence's last token (annotation, evaluation)."""

    def __call__(self, data_iterator: Any, model: torch.nn.Module) -> tuple[Tensor, Any]:
        batch = next(data_iterator)
        return _forward(model, batch), partial(self.loss_func, batch)

    @staticmethod
    def loss_func(batch: dict[str, Tensor], values: Tensor) -> tuple[Tensor, dict[str, Any]]:
        return values.new_zeros(()), {"scores": last_token_values(values.float(), batch).detach()}
