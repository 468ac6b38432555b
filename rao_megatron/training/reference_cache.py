"""Precomputed reference log-probs: P_ref(x) and R_ref(y) per sequence, stored beside the data.

File: safetensors (never pickle) with ``seq_keys`` int64 [N] (content hash of the tokenized prompt and
response), ``prompt_logps`` and ``response_logps`` float32 [N], and metadata fingerprints of the data,
the tokenizer and the tokenization settings. Training refuses a cache whose fingerprints differ from
its own data, so a cache can never silently be applied to other data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "rao_megatron.reference_logps/1"
SUFFIX = ".ref_logps.safetensors"


class ReferenceCacheError(ValueError):
    """A missing, stale or mismatched reference cache."""


def default_cache_path(data_path: str) -> Path:
    """``<data file>.ref_logps.safetensors`` beside a local data file (or dataset directory)."""
    return Path(str(data_path).rstrip("/") + SUFFIX)


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a local file's bytes (or of a directory's files); the name itself for a hub dataset."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    elif p.is_dir():
        for child in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(str(child.relative_to(p)).encode())
            h.update(file_fingerprint(child).encode())
    else:
        h.update(f"dataset:{path}".encode())
    return h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the vocabulary, special tokens and chat template: what decides the token ids."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return h.hexdigest()[:32]


def cache_fingerprints(*, data_path: str, tokenizer: Any, max_length: int, overlength: str) -> dict[str, str]:
    """The metadata a cache is checked against."""
    return {"data": file_fingerprint(data_path), "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_length": str(max_length), "overlength": overlength}


def write_cache(path: str | os.PathLike, seq_keys: Sequence[int], prompt_logps: Sequence[float],
                response_logps: Sequence[float], fingerprints: dict[str, str], extra: dict[str, str]) -> None:
    """Write the cache atomically (temp file + rename)."""
    path = Path(path)
    keys = torch.tensor(list(seq_keys), dtype=torch.int64)
    order = torch.argsort(keys)
    keys = keys[order]
    # the same (prompt, response) tokens can occur twice (duplicate rows); their log-probs are equal
    keep = torch.ones_like(keys, dtype=torch.bool)
    keep[1:] = keys[1:] != keys[:-1]
    order, keys = order[keep], keys[keep]
    tensors = {"seq_keys": keys.contiguous(),
               "prompt_logps": torch.tensor(list(prompt_logps), dtype=torch.float32)[order].contiguous(),
               "response_logps": torch.tensor(list(response_logps), dtype=torch.float32)[order].contiguous()}
    meta = {"format": FORMAT, **{f"fp_{k}": v for k, v in fingerprints.items()}, **extra}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


class ReferenceCache:
    """Loaded cache; ``lookup(seq_keys)`` returns the stored (P_ref, R_ref) lists."""

    def __init__(self, path: str | os.PathLike, expected: dict[str, str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ReferenceCacheError(f"reference cache not found: {self.path}; create it with "
                                      "`python -m rao_megatron.cli.precompute_reference --config ...` "
                                      "or set train.reference=on_the_fly")
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error type for a damaged header
            raise ReferenceCacheError(f"reference cache {self.path} is not a readable safetensors file ({e}); "
                                      "delete it and run rao_megatron.cli.precompute_reference again") from None
        if meta.get("format") != FORMAT:
            raise ReferenceCacheError(f"{self.path} is not a reference log-prob cache (format {meta.get('format')!r})")
        for key, value in expected.items():
            stored = meta.get(f"fp_{key}")
            if stored != value:
                what = {"data": "other data", "tokenizer": "another tokenizer",
                        "max_length": "another data.max_length", "overlength": "another data.overlength"}[key]
                raise ReferenceCacheError(
                    f"reference cache {self.path} was computed for {what} ({key}: cache {stored!r}, "
                    f"run {value!r}); recompute it with `python -m rao_megatron.cli.precompute_reference`")
        self.meta = meta
        tensors = load_file(str(self.path))
        self._index = {int(k): i for i, k in enumerate(tensors["seq_keys"].tolist())}
        self._prompt = tensors["prompt_logps"].tolist()
        self._response = tensors["response_logps"].tolist()

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, seq_keys: Sequence[int]) -> tuple[list[float], list[float]]:
        prompt, response = [], []
        for k in seq_keys:
            i = self._index.get(int(k))
            if i is None:
                raise ReferenceCacheError(f"reference cache {self.path} has no entry for a sequence of this run "
                                          f"(key {int(k)}); recompute it for this data")
            prompt.append(self._prompt[i])
            response.append(self._response[i])
        return prompt, response
