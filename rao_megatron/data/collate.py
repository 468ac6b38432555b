"""Token sequences -> fixed-shape micro-batch tensors that every forward step consumes.

A sequence is s = x ⊕ y with x the prompt (starting with the shared token t0) and y the response.
Per-token log-probs are indexed by the *label* position t (predicting s[t+1] from s[≤t]), so
    prompt_mask[t]   = 1  for t + 1 in [1, |x| − 1]   -> Σ gives P(x) = log π(x − t0 | t0)
    response_mask[t] = 1  for t + 1 in [|x|, |s| − 1]  -> Σ gives R(y) = log π(y | x)
Rows are right-padded to ``seq_length``; causal attention keeps pads from touching real tokens.
``prompt_positions`` / ``response_positions`` list the same label positions as flat indices into the
``[rows * seq_length]`` layout, built here on the host, so that the forward step can send only those hidden
states to the output layer without reading a size on the host (:func:`label_positions`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = -100
#: group id of a padding row (a micro-batch has a fixed number of rows for pipeline parallelism)
PAD_GROUP = -1


def collate_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                      seq_length: int, pad_id: int, group_ids: Sequence[int],
                      rewards: Sequence[float] | None = None,
                      is_reference_answer: Sequence[bool] | None = None,
                      ref_logps: Sequence[float] | None = None,
                      ref_prompt_logps: Sequence[float] | None = None,
                      seq_keys: Sequence[int] | None = None,
                      num_rows: int | None = None) -> dict[str, Tensor]:
    """Build a micro-batch dict of ``[B, S]`` token tensors and ``[B]`` per-sequence tensors.

    ``num_rows`` pads the batch with empty rows (group id ``PAD_GROUP``) to a fixed row count.
    ``seq_keys`` are the sequences' content hashes (:func:`sequence_key`), used by the reference cache.
    """
    n = len(prompts)
    rows = n if num_rows is None else num_rows
    if rows < n:
        raise ValueError(f"num_rows={rows} is smaller than the {n} sequences given")
    tokens = torch.full((rows, seq_length), pad_id, dtype=torch.int64)
    labels = torch.full((rows, seq_length), IGNORE_INDEX, dtype=torch.int64)
    prompt_mask = torch.zeros((rows, seq_length), dtype=torch.bool)
    response_mask = torch.zeros((rows, seq_length), dtype=torch.bool)
    lengths = torch.zeros(rows, dtype=torch.int64)
    seq_lengths = torch.ones(rows, dtype=torch.int64)
    for i, (x, y) in enumerate(zip(prompts, responses)):
        s = list(x) + list(y)
        if len(x) < 1 or len(y) < 1:
            raise ValueError(f"sequence {i}: prompt and response must each hold at least one token")
        if len(s) > seq_length:
            raise ValueError(f"sequence {i}: {len(s)} tokens exceed seq_length={seq_length}")
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.int64)
        labels[i, :len(s) - 1] = tokens[i, 1:len(s)]
        prompt_mask[i, :len(x) - 1] = True
        response_mask[i, len(x) - 1:len(s) - 1] = True
        lengths[i] = len(y)
        seq_lengths[i] = len(s)
    gid = torch.full((rows,), PAD_GROUP, dtype=torch.int64)
    gid[:n] = torch.as_tensor(list(group_ids), dtype=torch.int64)
    batch = {
        "tokens": tokens, "labels": labels, "prompt_mask": prompt_mask, "response_mask": response_mask,
        "position_ids": torch.arange(seq_length, dtype=torch.int64).expand(rows, seq_length).contiguous(),
        "lengths": lengths, "seq_lengths": seq_lengths, "group_ids": gid,
        **label_positions(prompt_mask, response_mask),
    }
    batch.update(per_sequence_tensors(dict(rewards=rewards, ref_logps=ref_logps, ref_prompt_logps=ref_prompt_logps,
                                           is_reference_answer=is_reference_answer, seq_keys=seq_keys), n, rows))
    return batch


def label_positions(prompt_mask: Tensor, response_mask: Tensor) -> dict[str, Tensor]:
    """``{"prompt_positions": [Tp], "response_positions": [Tr]}``: the flat indices (row-major, into
    ``[rows * seq_length]``) where each mask is set, ascending; computed on the host at collation."""
    return {"prompt_positions": torch.nonzero(prompt_mask.reshape(-1)).reshape(-1),
            "response_positions": torch.nonzero(response_mask.reshape(-1)).reshape(-1)}


#: the optional per-sequence columns of a micro-batch and their dtypes
PER_SEQUENCE_COLUMNS = {"rewards": torch.float32, "ref_logps": torch.float32, "ref_prompt_logps": torch.float32,
                        "is_reference_answer": torch.bool, "seq_keys": torch.int64}


def per_sequence_tensors(columns: dict[str, Sequence | None], n: int, rows: int) -> dict[str, Tensor]:
    """``[rows]`` tensors of the given per-sequence columns (``n`` values each, zero-padded); None skips one."""
    out = {}
    for name, values in columns.items():
        if values is not None:
            dtype = PER_SEQUENCE_COLUMNS[name]
            t = torch.zeros(rows, dtype=dtype)
            t[:n] = torch.as_tensor(list(values), dtype=dtype).reshape(n)
            out[name] = t
    return out


def sequence_key(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> int:
    """A stable signed 63-bit content hash of a tokenized (prompt, response) pair."""
    h = hashlib.blake2b(digest_size=8)
    h.update(_int64_bytes(prompt_ids))
    h.update(b"|")
    h.update(_int64_bytes(response_ids))
    return int.from_bytes(h.digest(), "little") >> 1


def _int64_bytes(ids: Sequence[int]) -> bytes:
    """The ids as little-endian int64 bytes: one copy for arrays (token-store views), struct for lists."""
    if isinstance(ids, np.ndarray):
        return ids.astype("<i8").tobytes()
    return struct.pack(f"<{len(ids)}q", *ids)


def num_valid_groups(batch: dict[str, Tensor]) -> int:
    """Distinct real groups in a micro-batch (padding rows excluded)."""
    gid = batch["group_ids"]
    return int(gid[gid != PAD_GROUP].unique().numel())
