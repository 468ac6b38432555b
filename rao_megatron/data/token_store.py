"""Tokenize once: a data file's tokenized groups in flat ``int32`` arrays on disk, memory-mapped by every rank.

Tokenizing 40k UltraFeedback rows costs about a minute and ~40 bytes per token as Python int lists; done on
every rank (and again by ``precompute_reference``), a 64-GPU job pays it 64 times. A store is written
once -- by global rank 0, while the others wait -- under a directory named by the fingerprint of
everything the tokens depend on (data content, tokenizer, length policy, loss filtering, t0), and read by
every later rank and command as ``np.load(mmap_mode="r")``: 4 bytes per token, shared between the ranks of a
node through the page cache. Groups hand out numpy views of the shared arrays, never copies.

Layout of ``<root>/<fingerprint>/``: ``tokens.npy`` (all prompts and responses, int32), ``groups.npz``
(per group: id, source row, prompt offset/length, first response, response count; per response: offset,
length, reward, reference-answer flag), ``meta.json`` (format, fingerprint, the data report, t0, where
each row came from). Written to a temporary directory and renamed: a store is complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataReport
from .tokenize import TokenizedGroup

FORMAT = "rao-token-store-1"


def store_key(parts: dict[str, Any]) -> str:
    """A short stable name for a store from the values its tokens depend on."""
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=10).hexdigest()


def write_store(path: str | os.PathLike, groups: Sequence[TokenizedGroup], report: DataReport,
                where: dict[int, str] | None = None, parts: dict[str, Any] | None = None) -> Path:
    """Write ``groups`` (and the report of how they were made) to the store directory ``path``, atomically."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    chunks: list[np.ndarray] = []
    offset = 0

    def put(ids: Sequence[int]) -> tuple[int, int]:
        nonlocal offset
        arr = np.asarray(ids, dtype=np.int32)
        chunks.append(arr)
        offset += arr.size
        return offset - arr.size, arr.size

    g_id, g_row, g_poff, g_plen, g_first, g_count = [], [], [], [], [], []
    r_off, r_len, r_reward, r_ref = [], [], [], []
    for grp in groups:
        g_id.append(grp.group_id)
        g_row.append(grp.row)
        start, n = put(grp.prompt_ids)
        g_poff.append(start)
        g_plen.append(n)
        g_first.append(len(r_off))
        g_count.append(len(grp.responses))
        for j, y in enumerate(grp.responses):
            start, n = put(y)
            r_off.append(start)
            r_len.append(n)
            r_reward.append(grp.rewards[j] if grp.rewards is not None else np.nan)
            r_ref.append(int(grp.is_reference[j]) if grp.is_reference is not None else -1)
    np.save(tmp / "tokens.npy", np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32))
    np.savez(tmp / "groups.npz", group_id=np.asarray(g_id, np.int64), row=np.asarray(g_row, np.int64),
             prompt_offset=np.asarray(g_poff, np.int64), prompt_length=np.asarray(g_plen, np.int32),
             first_response=np.asarray(g_first, np.int64), responses=np.asarray(g_count, np.int32),
             response_offset=np.asarray(r_off, np.int64), response_length=np.asarray(r_len, np.int32),
             reward=np.asarray(r_reward, np.float64), reference=np.asarray(r_ref, np.int8))
    has_rewards = any(g.rewards is not None for g in groups)
    meta = {"format": FORMAT, "parts": parts or {}, "report": {**asdict(report), "dropped": dict(report.dropped)},
            "has_rewards": has_rewards, "where": {str(k): v for k, v in (where or {}).items()}}
    (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def read_store(path: str | os.PathLike) -> tuple[list[TokenizedGroup], DataReport, dict[int, str]]:
    """The groups of a store (token lists are read-only views of the memory-mapped array), its report and
    row labels. Raises ``ValueError`` for a directory that is not a complete store of this format."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a token store ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a token store of format {meta.get('format')!r}, expected {FORMAT}")
    # a plain ndarray over the mapped file: slicing it costs far less than numpy.memmap's __getitem__
    tokens = np.load(path / "tokens.npy", mmap_mode="r").view(np.ndarray)
    with np.load(path / "groups.npz") as z:
        t = {k: z[k] for k in z.files}
    has_rewards = bool(meta["has_rewards"])
    groups = []
    for g in range(t["group_id"].shape[0]):
        first, count = int(t["first_response"][g]), int(t["responses"][g])
        rs = range(first, first + count)
        p0 = int(t["prompt_offset"][g])
        refs = [int(t["reference"][r]) for r in rs]
        groups.append(TokenizedGroup(
            group_id=int(t["group_id"][g]), row=int(t["row"][g]),
            prompt_ids=tokens[p0:p0 + int(t["prompt_length"][g])],
            responses=[tokens[int(t["response_offset"][r]):int(t["response_offset"][r]) + int(t["response_length"][r])]
                       for r in rs],
            rewards=[float(t["reward"][r]) for r in rs] if has_rewards else None,
            is_reference=None if all(x < 0 for x in refs) else [x == 1 for x in refs]))
    fields = dict(meta["report"])
    fields["dropped"] = Counter(fields.get("dropped", {}))
    report = DataReport(**fields)
    return groups, report, {int(k): v for k, v in meta.get("where", {}).items()}
