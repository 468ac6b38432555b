"""Sequence packing: whole groups into fixed-shape ``[rows, seq_length]`` micro-batches without padding waste.

A packed micro-batch holds several sequences per row. Each sequence keeps its own positions (restarting
at 0) and attends only to itself: ``segment_ids[r, t]`` names the sequence a token belongs to (-1 for
padding), from which the forward step builds a block-diagonal causal mask (local spec, CPU) or
``PackedSeqParams`` with ``cu_seqlens`` over the flattened row-major tokens (Transformer Engine, THD).
Per-sequence tensors (``lengths``, ``group_ids``, rewards, reference log-probs, keys) have one entry per
packed sequence in the caller's order (segment n is the n-th placed sequence by input index), so the
order of a group's responses -- which pairs without rewards rely on (chosen first) -- survives packing;
``last_index`` is each sequence's last token in the flattened ``[rows * seq_length]`` layout (the reward
model's score position); ``prompt_positions`` / ``response_positions`` are the masks' flat indices, as in
:mod:`.collate`.

Placement is first-fit decreasing at two levels: groups (by total tokens, largest first) go to the first
micro-batch where all their sequences fit, sequences (longest first) to the first row with room. A group
never straddles two micro-batches, so the loss always sees complete groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .collate import IGNORE_INDEX, label_positions, per_sequence_tensors


class GroupTooLargeError(ValueError):
    """A group whose sequences cannot share one micro-batch of the configured size."""


def plan_micro_batches(group_lengths: Sequence[Sequence[int]], *, rows: int,
                       seq_length: int) -> list[list[list[tuple[int, int]]]]:
    """Micro-batches -> rows -> ``(group, sequence)`` placements, for sequences of the given token lengths.

    ``group_lengths[g][j]`` is the length of sequence j of group g. Raises :class:`GroupTooLargeError` for a
    group that does not fit an empty micro-batch (the message names its index and token count).
    """
    order = sorted(range(len(group_lengths)), key=lambda g: (-sum(group_lengths[g]), g))
    batches: list[list[list[tuple[int, int]]]] = []
    free: list[list[int]] = []  # free tokens per row, per micro-batch
    # what a group needs of a micro-batch at least (its tokens in all, its longest sequence in one row),
    # checked against every micro-batch at once: trying the full ones one by one in Python made planning a
    # large data set quadratic (an eval pass, precompute_reference; equal_micro_batches plans every rank's)
    total_free = np.zeros(64, dtype=np.int64)
    widest_free = np.zeros(64, dtype=np.int64)
    for g in order:
        lengths = group_lengths[g]
        seqs = sorted(range(len(lengths)), key=lambda j: (-lengths[j], j))
        count = len(batches)
        room = (total_free[:count] >= sum(lengths)) & (widest_free[:count] >= max(lengths, default=0))
        for b in [*np.flatnonzero(room).tolist(), count]:  # the skipped ones would refuse the group anyway
            if b == count:
                batches.append([[] for _ in range(rows)])
                free.append([seq_length] * rows)
                if b == len(total_free):  # room for twice as many
                    total_free = np.concatenate([total_free, np.zeros_like(total_free)])
                    widest_free = np.concatenate([widest_free, np.zeros_like(widest_free)])
            trial = list(free[b])
            placed = []
            for j in seqs:
                n = lengths[j]
                row = next((r for r in range(rows) if trial[r] >= n), None)
                if row is None:
                    break
                trial[row] -= n
                placed.append((row, j))
            if len(placed) == len(seqs):
                free[b] = trial
                total_free[b], widest_free[b] = sum(trial), max(trial)
                for row, j in placed:
                    batches[b][row].append((g, j))
                break
            if b == count:  # not even an empty micro-batch takes it
                raise GroupTooLargeError(
                    f"group {g}: {len(seqs)} sequences of {sum(lengths)} tokens "
                    f"(longest {max(lengths)}) do not fit one micro-batch of {rows} rows x {seq_length} "
                    "tokens; raise data.micro_batch_tokens or lower data.max_responses")
    return batches


def collate_packed(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                   placement: Sequence[Sequence[int]], seq_length: int, pad_id: int, group_ids: Sequence[int],
                   **per_sequence: Sequence | None) -> dict[str, Tensor]:
    """A packed micro-batch: ``placement[r]`` lists the sequence indices (into ``prompts``) of row r.

    ``per_sequence`` takes the optional per-sequence columns of :func:`collate_sequences` (rewards,
    is_reference_answer, ref_logps, ref_prompt_logps, seq_keys). Sequence n of the batch is the n-th
    smallest placed index (:func:`packed_order`).
    """
    rows = len(placement)
    order = packed_order(placement)
    number = {i: n for n, i in enumerate(order)}
    tokens = torch.full((rows, seq_length), pad_id, dtype=torch.int64)
    labels = torch.full((rows, seq_length), IGNORE_INDEX, dtype=torch.int64)
    prompt_mask = torch.zeros((rows, seq_length), dtype=torch.bool)
    response_mask = torch.zeros((rows, seq_length), dtype=torch.bool)
    position_ids = torch.zeros((rows, seq_length), dtype=torch.int64)
    segment_ids = torch.full((rows, seq_length), -1, dtype=torch.int64)
    n_seq = len(order)
    if len(number) != n_seq:
        raise ValueError("a sequence is placed twice")
    lengths = torch.zeros(n_seq, dtype=torch.int64)
    seq_lengths = torch.zeros(n_seq, dtype=torch.int64)
    last_index = torch.zeros(n_seq, dtype=torch.int64)
    bounds = [0]  # cu_seqlens over the flattened rows: every sequence, and each row's padding tail
    for r, row in enumerate(placement):
        offset = 0
        for i in row:
            x, y = prompts[i], responses[i]
            if len(x) < 1 or len(y) < 1:
                raise ValueError(f"sequence {i}: prompt and response must each hold at least one token")
            s = list(x) + list(y)
            end = offset + len(s)
            if end > seq_length:
                raise ValueError(f"row {r}: sequences exceed seq_length={seq_length}")
            tokens[r, offset:end] = torch.tensor(s, dtype=torch.int64)
            labels[r, offset:end - 1] = tokens[r, offset + 1:end]
            prompt_mask[r, offset:offset + len(x) - 1] = True
            response_mask[r, offset + len(x) - 1:end - 1] = True
            position_ids[r, offset:end] = torch.arange(len(s))
            n = number[i]
            segment_ids[r, offset:end] = n
            lengths[n], seq_lengths[n], last_index[n] = len(y), len(s), r * seq_length + end - 1
            bounds.append(r * seq_length + end)
            offset = end
        if offset < seq_length:
            bounds.append((r + 1) * seq_length)
    batch = {
        "tokens": tokens, "labels": labels, "prompt_mask": prompt_mask, "response_mask": response_mask,
        "position_ids": position_ids, "segment_ids": segment_ids, "lengths": lengths,
        "seq_lengths": seq_lengths, "last_index": last_index,
        "group_ids": torch.as_tensor([group_ids[i] for i in order], dtype=torch.int64).reshape(n_seq),
        "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        "max_seqlen": max((b - a for a, b in zip(bounds, bounds[1:])), default=0),  # an int: read on the host
        **label_positions(prompt_mask, response_mask),
    }
    batch.update(per_sequence_tensors({k: None if v is None else [v[i] for i in order]
                                       for k, v in per_sequence.items()}, n_seq, n_seq))
    return batch


def packed_order(placement: Sequence[Sequence[int]]) -> list[int]:
    """The input indices of a packed batch's sequences, in the order of its per-sequence tensors."""
    return sorted(i for row in placement for i in row)


def empty_packed(rows: int, seq_length: int, pad_id: int, **per_sequence: Sequence | None) -> dict[str, Tensor]:
    """An all-padding packed micro-batch: a DP rank with nothing left still runs the schedule (``per_sequence``:
    empty columns, so that it has the keys its real neighbours have)."""
    return collate_packed([], [], placement=[[] for _ in range(rows)], seq_length=seq_length, pad_id=pad_id,
                          group_ids=[], **per_sequence)


def layout_summary(lengths: Sequence[Sequence[int]], *, seq_length: int, rows: int, packing: bool,
                   sample: int = 512) -> str:
    """One line for the start-up report: how full the micro-batches will be, padded and packed.

    Packing is measured on the first ``sample`` groups (first-fit decreasing over the whole data set would
    cost quadratic time at start-up; the per-step ``packing_efficiency`` metric is exact).
    """
    seqs = [n for group in lengths for n in group]
    if not seqs:
        return "layout: no sequences"
    real = sum(seqs)
    padded = real / (len(seqs) * seq_length)
    part = lengths[:sample]
    plans = plan_micro_batches(part, rows=rows, seq_length=seq_length)
    packed = sum(map(sum, part)) / (len(plans) * rows * seq_length)
    chosen = "packed" if packing else "padded (data.packing=false)"
    return (f"layout: {chosen}; {len(seqs)} sequences, mean {real / len(seqs):.0f} of {seq_length} tokens; "
            f"token slots filled: padded {padded:.1%}, packed into {rows}-row micro-batches {packed:.1%}")


def is_packed(batch: dict[str, Tensor]) -> bool:
    return "segment_ids" in batch


def packed_attention_mask(segment_ids: Tensor) -> Tensor:
    """``[R, 1, S, S]`` boolean mask, True = masked: causal within each sequence, nothing across sequences.

    Padding tokens attend to themselves only, so their softmax row is never all -inf (NaN).
    """
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = causal & same & (segment_ids[:, :, None] >= 0)
    allowed |= torch.eye(s, dtype=torch.bool, device=segment_ids.device)
    return ~allowed[:, None]


__all__ = ["GroupTooLargeError", "collate_packed", "empty_packed", "is_packed", "layout_summary",
           "packed_attention_mask", "packed_order", "plan_micro_batches"]
