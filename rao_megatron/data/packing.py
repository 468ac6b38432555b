"""Sequence packing: whole groups into fixed-shape ``[rows, seq_length]`` micro-batches without padding waste.

A packed micro-batch holds several sequences per row. Each sequence keeps its own positions (restarting
at 0) and attends only to itself: ``segment_ids[r, t]`` names the sequence a token belongs to (-1 for
padding), from which the forward step builds a block-diagonal causal mask (local spec, CPU) or
``PackedSeqParams`` with ``cu_seqlens`` over the flattened row-major tokens (Transformer Engine, THD).
Per-sequence tensors (``lengths``, ``group_ids``, rewards, reference log-probs, keys) have one entry per
packed sequence in the caller's order (segment n is the n-th placed sequence by input index), so the
order of a group's responses -- which pairs without rewards rely on (chosen first) -- survives packing;
``last_index`` is each sequence's last token in the flattened ``[rows * seq_length]`` layout (the reward
model's score position); the loss entries (``<part>_positions`` / ``_targets`` / ``_sequences``) list what the
output layer reads, as flat indices with the token each predicts and the sequence it counts for.

The shared-prompt layout (a placement unit that is a tuple of a group's sequences) holds the prompt once and
then each response, positions continuing from the prompt; ``prefix_ids`` lets each response see the prompt,
and the prompt's last position is a loss entry once per response (each predicts its own first token).

Placement is first-fit decreasing at two levels: groups (by total tokens, largest first) go to the first
micro-batch where all their sequences fit, sequences (longest first) to the first row with room. A group
never straddles two micro-batches, so the loss always sees complete groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .collate import IGNORE_INDEX, PER_SEQUENCE_COLUMNS, collate_sequences, per_sequence_tensors


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
                   placement: Sequence[Sequence[int | tuple[int, ...]]], seq_length: int, pad_id: int,
                   group_ids: Sequence[int], **per_sequence: Sequence | None) -> dict[str, Tensor]:
    """A packed micro-batch: ``placement[r]`` lists the units (into ``prompts``) of row r, each a sequence
    index, or a tuple of the indices of sequences that share one prompt (the shared-prompt layout: the prompt
    once, then each response, which attends to the prompt and itself only and whose positions continue from
    the prompt).

    ``per_sequence`` takes the optional per-sequence columns of :func:`collate_sequences` (rewards,
    is_reference_answer, ref_logps, ref_prompt_logps, seq_keys). Sequence n of the batch is the n-th
    smallest placed index (:func:`packed_order`).

    Besides the token tensors, a packed batch lists its loss entries on the host: ``<part>_positions`` (flat
    hidden-state indices), ``<part>_targets`` (the token each predicts) and ``<part>_sequences`` (the sequence
    it counts for), for part prompt (P(x), once per shared prompt) and response (R(y): a shared prompt's last
    token predicts every response's first token, so that position is listed once per response), and
    ``prompt_source[n]``: the sequence whose prompt entries hold sequence n's P(x). ``prefix_ids[r, t]``: the
    segment a response token also attends to (its shared prompt's; -2 for none); a shared prompt's segment id
    is ``n_seq + k`` for the k-th shared prompt. ``shared_prompts`` counts them.
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
    prefix_ids = torch.full((rows, seq_length), -2, dtype=torch.int64)
    n_seq = len(order)
    if len(number) != n_seq:
        raise ValueError("a sequence is placed twice")
    lengths = torch.zeros(n_seq, dtype=torch.int64)
    seq_lengths = torch.zeros(n_seq, dtype=torch.int64)
    last_index = torch.zeros(n_seq, dtype=torch.int64)
    prompt_source = torch.arange(n_seq, dtype=torch.int64)
    entries: dict[str, list[list[int]]] = {part: [[], [], []] for part in ("prompt", "response")}

    def add(part: str, flat: int, target: Sequence[int], n: int) -> None:
        """Loss entries at flat positions ``flat ..`` predicting ``target``, counted for sequence ``n``."""
        positions, targets, sequences = entries[part]
        positions.extend(range(flat, flat + len(target)))
        targets.extend(int(t) for t in target)
        sequences.extend([n] * len(target))

    bounds = [0]  # cu_seqlens over the flattened rows: every sequence, and each row's padding tail
    shared = 0
    for r, row in enumerate(placement):
        offset = 0
        for unit in row:
            members = unit if isinstance(unit, tuple) else (unit,)
            x = prompts[members[0]]
            for i in members:
                if len(prompts[i]) < 1 or len(responses[i]) < 1:
                    raise ValueError(f"sequence {i}: prompt and response must each hold at least one token")
                if list(prompts[i]) != list(x):
                    raise ValueError(f"sequences {members[0]} and {i} share a unit but not a prompt")
            end = offset + len(x) + sum(len(responses[i]) for i in members)
            if end > seq_length:
                raise ValueError(f"row {r}: sequences exceed seq_length={seq_length}")
            base = r * seq_length
            first = number[members[0]]
            tokens[r, offset:offset + len(x)] = torch.as_tensor(list(x), dtype=torch.int64)
            position_ids[r, offset:offset + len(x)] = torch.arange(len(x))
            prompt_mask[r, offset:offset + len(x) - 1] = True
            labels[r, offset:offset + len(x) - 1] = tokens[r, offset + 1:offset + len(x)]
            add("prompt", base + offset, x[1:], first)
            if isinstance(unit, tuple):
                segment_ids[r, offset:offset + len(x)] = n_seq + shared
            at = offset + len(x)
            for i in members:
                y, n = responses[i], number[i]
                stop = at + len(y)
                tokens[r, at:stop] = torch.as_tensor(list(y), dtype=torch.int64)
                position_ids[r, at:stop] = torch.arange(len(x), len(x) + len(y))
                segment_ids[r, at:stop] = n
                labels[r, at:stop - 1] = tokens[r, at + 1:stop]
                response_mask[r, at:stop - 1] = True
                add("response", base + offset + len(x) - 1, y[:1], n)  # the prompt's last token predicts y[0]
                add("response", base + at, y[1:], n)
                if isinstance(unit, tuple):
                    prefix_ids[r, at:stop] = n_seq + shared
                    prompt_source[n] = first
                else:
                    segment_ids[r, offset:at] = n
                    labels[r, at - 1] = y[0]
                    response_mask[r, at - 1] = True
                lengths[n], seq_lengths[n], last_index[n] = len(y), len(x) + len(y), base + stop - 1
                at = stop
            shared += isinstance(unit, tuple)
            bounds.append(base + end)
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
        "prompt_source": prompt_source, "shared_prompts": shared,
    }
    if shared:
        batch["prefix_ids"] = prefix_ids
    for part, (positions, targets, sequences) in entries.items():
        batch.update({f"{part}_positions": torch.tensor(positions, dtype=torch.int64),
                      f"{part}_targets": torch.tensor(targets, dtype=torch.int64),
                      f"{part}_sequences": torch.tensor(sequences, dtype=torch.int64)})
    batch.update(per_sequence_tensors({k: None if v is None else [v[i] for i in order]
                                       for k, v in per_sequence.items()}, n_seq, n_seq))
    return batch


def packed_order(placement: Sequence[Sequence[int | tuple[int, ...]]]) -> list[int]:
    """The input indices of a packed batch's sequences, in the order of its per-sequence tensors."""
    return sorted(i for row in placement for unit in row for i in (unit if isinstance(unit, tuple) else (unit,)))


def empty_packed(rows: int, seq_length: int, pad_id: int, **per_sequence: Sequence | None) -> dict[str, Tensor]:
    """An all-padding packed micro-batch: a DP rank with nothing left still runs the schedule (``per_sequence``:
    empty columns, so that it has the keys its real neighbours have)."""
    return collate_packed([], [], placement=[[] for _ in range(rows)], seq_length=seq_length, pad_id=pad_id,
                          group_ids=[], **per_sequence)


def padding_like(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """An all-padding micro-batch of ``batch``'s shape and layout (packed or padded) with its per-sequence
    columns, empty: the loss skips it."""
    rows, length = batch["tokens"].shape
    columns: dict[str, Sequence] = {k: [] for k in PER_SEQUENCE_COLUMNS if k in batch}
    if is_packed(batch):
        return empty_packed(rows, length, 0, **columns)
    return collate_sequences([], [], seq_length=length, pad_id=0, group_ids=[], num_rows=rows, **columns)


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


def packed_attention_mask(segment_ids: Tensor, prefix_ids: Tensor | None = None) -> Tensor:
    """``[R, 1, S, S]`` boolean mask, True = masked: causal within each sequence, nothing across sequences;
    with ``prefix_ids`` (the shared-prompt layout) a token also sees the segment its prefix id names (a
    response its group's prompt).

    Padding tokens attend to themselves only, so their softmax row is never all -inf (NaN).
    """
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    if prefix_ids is not None:
        same |= prefix_ids[:, :, None] == segment_ids[:, None, :]
    allowed = causal & same & (segment_ids[:, :, None] >= 0)
    allowed |= torch.eye(s, dtype=torch.bool, device=segment_ids.device)
    return ~allowed[:, None]


__all__ = ["GroupTooLargeError", "collate_packed", "empty_packed", "is_packed", "layout_summary",
           "packed_attention_mask", "packed_order", "padding_like", "plan_micro_batches"]
