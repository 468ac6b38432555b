"""Precomputed reference log-probs: P_ref(x) and R_ref(y) per sequence, stored beside the data.

File: safetensors (never pickle) with ``seq_keys`` int64 [N] (content hash of the tokenized prompt and
response), ``prompt_logps`` and ``response_logps`` float32 [N], and metadata that binds the cache to
what decides those numbers (format ``rao_megatron.reference_logps/2``):

- strict (``fp_*``; a mismatch is a :class:`ReferenceCacheError` naming the field and both values):
  the reference model's *content* (:func:`checkpoint_content_id`: not its path, so a checkpoint replaced
  in place is caught), the tokenizer, ``data.max_length`` / ``data.overlength``, ``model.dtype`` and
  ``model.logprob_precision`` (bf16 or fp8 sums differ from fp32 ones by more than the step-0 guard allows
  on long sequences: recompute rather than train against another precision's numbers);
- the data (``fp_data``): a hash of the tokenized sequences only — rewards and row order do not change a
  log-prob, so re-scoring the data keeps its cache. Every sequence of the run must have an entry
  (:func:`check_coverage`, at start-up, naming the first missing row and how many); a cache computed for
  other data that still covers every sequence is used, with a note;
- recorded only (``info_*``): ``model.logprob_impl`` (reference / chunked / triton compute the same sums to
  fp32 rounding: a mismatch is a warning), the model's source path, the layout, the creation time.

The last guard is :func:`delta_check` at step 0: the policy *is* the reference then, so the mean
|Δ_R| and |Δ_P| per token measure only rounding; above :data:`MAX_STEP0_DELTA_PER_TOKEN` the cache is
not this model's numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rao_megatron.config import guarded_write

FORMAT = "rao_megatron.reference_logps/2"
SUFFIX = ".ref_logps.safetensors"
#: Step-0 guard: the largest mean |Δ| per token (nats) of a cache against the policy it starts from.
#: At step 0 the policy is the reference, so Δ is rounding only: measured on the tiny model between a
#: cache made at TP1 and training at TP2, 9e-8 nats/token in fp32 and 2e-4 in bf16 (larger models and
#: longer sums add to the bf16 figure, not by two orders). Two checkpoints a few hundred SFT steps apart
#: differ by 0.1 nats/token or more on their own data. 0.02 sits a hundred times above the measured bf16
#: rounding and five times below a real model change; at that level a 100-token response carries a
#: 2-nat bias, β·2 = 0.2 reward units at β = 0.1 — already as large as a typical RAO residual.
MAX_STEP0_DELTA_PER_TOKEN = 0.02
#: content identity of a checkpoint: files up to this size are hashed whole, larger ones sampled
SMALL_FILE = 1 << 20
SAMPLE_BYTES = 1 << 16
SAMPLES_PER_FILE = 16

#: the strict fingerprints and how an error names a mismatch
_WHAT = {"model": "another model", "tokenizer": "another tokenizer", "max_length": "another data.max_length",
         "overlength": "another data.overlength", "dtype": "another model.dtype",
         "logprob_precision": "another model.logprob_precision", "data": "other data"}


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


def checkpoint_content_id(directory: str | os.PathLike) -> str:
    """What a checkpoint directory holds, not where: every file's relative path and size, the bytes of
    the small files (``rao_model.json``, dist_checkpointing's ``.metadata`` / ``metadata.json`` /
    ``common.pt``) and :data:`SAMPLES_PER_FILE` evenly spaced 64 KiB samples of each large (tensor) file.

    Cost: at most 1 MiB read per file whatever the model size (Llama-3-8B at TP8: a few dozen files, a
    few dozen MiB; run on rank 0 only), against a full hash of 16-32 GB of tensors (minutes per start).
    Any other model or training step changes every sampled region; an edit confined to bytes between
    the samples is left to the step-0 guard.
    """
    root = Path(directory)
    h = hashlib.sha256()
    for f in sorted(q for q in root.rglob("*") if q.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root).as_posix()}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= SMALL_FILE:
                h.update(fh.read())
                continue
            for k in range(SAMPLES_PER_FILE):
                fh.seek((size - SAMPLE_BYTES) * k // (SAMPLES_PER_FILE - 1))
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()[:32]


def config_content_id(hf_config: dict[str, Any], seed: int) -> str:
    """A random-init reference: the architecture (HF config, without volatile keys) and the init seed."""
    config = {k: v for k, v in hf_config.items() if k not in ("transformers_version", "_name_or_path")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(f"\0seed={seed}".encode())
    return h.hexdigest()[:32]


def sequences_fingerprint(seq_keys: Iterable[int]) -> str:
    """The data as the reference sees it: a hash of the distinct tokenized sequences (order and rewards
    play no part)."""
    h = hashlib.sha256()
    for k in sorted(set(int(k) for k in seq_keys)):
        h.update(k.to_bytes(8, "little", signed=True))
    return h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the vocabulary, special tokens and chat template: what decides the token ids."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return h.hexdigest()[:32]


def write_cache(path: str | os.PathLike, seq_keys: Sequence[int], prompt_logps: Sequence[float],
                response_logps: Sequence[float], fingerprints: dict[str, str], extra: dict[str, str]) -> None:
    """Write the cache atomically (temp file + rename). ``extra`` keys are stored as given (``info_*``)."""
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
    try:
        with guarded_write(path, "reference cache", partial=tmp):  # a full disk: one line; path is kept
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _shown(value: str | None, source: str | None) -> str:
    return repr(value) + (f" from {source}" if source else "")


class ReferenceCache:
    """Loaded cache; ``lookup(seq_keys)`` returns the stored (P_ref, R_ref) lists.

    ``expected``: the run's fingerprints (``data`` is checked by :func:`check_coverage`, the rest here);
    ``info``: the run's ``info_*`` values (a differing ``logprob_impl`` is reported through ``warn``).
    """

    def __init__(self, path: str | os.PathLike, expected: dict[str, str], info: dict[str, str] | None = None,
                 warn: Callable[[str], None] = print) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            what = "is a directory, not a file" if self.path.is_dir() else "not found"
            raise ReferenceCacheError(f"reference cache {what}: {self.path}; create it with "
                                      "`python -m rao_megatron.cli.precompute_reference --config ...` "
                                      "or set train.reference=on_the_fly")

        try:
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error type for a damaged header
            raise ReferenceCacheError(f"reference cache {self.path} is not a readable safetensors file ({e}); "
                                      "delete it and run rao_megatron.cli.precompute_reference again") from None
        if meta.get("format") != FORMAT:
            older = str(meta.get("format", "")).startswith("rao_megatron.reference_logps/")
            raise ReferenceCacheError(
                f"reference cache {self.path}: field 'format' differs: cache {meta.get('format')!r}, this version "
                f"{FORMAT!r}; " + ("it predates content-bound caches: recompute it with "
                                   "`python -m rao_megatron.cli.precompute_reference`" if older else
                                   "it is not a reference log-prob cache"))
        info = info or {}
        for key, value in expected.items():
            stored = meta.get(f"fp_{key}")
            if key == "data" or stored == value:
                continue
            if key == "model":
                shown = (f"cache {_shown(stored, meta.get('info_model_source'))}, run "
                         f"{_shown(value, info.get('info_model_source'))}")
            else:
                shown = f"cache {stored!r}, run {value!r}"
            raise ReferenceCacheError(
                f"reference cache {self.path} was computed for {_WHAT.get(key, 'another ' + key)} ({key}: {shown}); "
                "recompute it with `python -m rao_megatron.cli.precompute_reference`")
        impl, mine = meta.get("info_logprob_impl"), info.get("info_logprob_impl")
        if impl and mine and impl != mine:
            warn(f"warning: reference cache {self.path} was computed with model.logprob_impl={impl}, this run uses "
                 f"{mine}: both compute the same sums to fp32 rounding (the step-0 check measures it)")
        self.meta = meta
        self.data_mismatch = (meta.get("fp_data"), expected["data"]) \
            if "data" in expected and meta.get("fp_data") != expected["data"] else None
        tensors = load_file(str(self.path))
        self._index = {int(k): i for i, k in enumerate(tensors["seq_keys"].tolist())}
        self._prompt = tensors["prompt_logps"].tolist()
        self._response = tensors["response_logps"].tolist()

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: int) -> bool:
        return int(key) in self._index

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


def check_coverage(cache: ReferenceCache, sequences: Sequence[tuple[int, str]], source: str,
                   note: Callable[[str], None] = print) -> None:
    """Every ``(seq_key, "line 7 response 2")`` of ``source`` must have an entry; else one error naming
    the first missing sequence and how many are missing (with the data fingerprints when they differ)."""
    missing = [where for key, where in sequences if key not in cache]
    differs = ""
    if cache.data_mismatch is not None:
        stored, run = cache.data_mismatch
        differs = f" was computed for other data (data: cache {stored!r}, run {run!r}) and"
    if missing:
        raise ReferenceCacheError(
            f"reference cache {cache.path}{differs} has no entry for {len(missing)} of {len(sequences)} sequences "
            f"of {source}, the first {source} {missing[0]}; recompute it with "
            "`python -m rao_megatron.cli.precompute_reference`")
    if differs:
        note(f"note: reference cache {cache.path}{differs} holds every sequence of {source}: using it")


def delta_check(mean_abs: dict[str, float], per_token: dict[str, float], sequences: int, path: str | os.PathLike,
                limit: float = MAX_STEP0_DELTA_PER_TOKEN) -> str:
    """The step-0 line (mean |Δ_R|, |Δ_P| per sequence and per token), or an error above ``limit``."""
    line = (f"reference check at step 0 ({sequences} sequences, cache {path}): mean |Δ_R| = "
            f"{mean_abs['R']:.3g} nats ({per_token['R']:.3g}/token), mean |Δ_P| = {mean_abs['P']:.3g} nats "
            f"({per_token['P']:.3g}/token); limit {limit:g}/token")
    worst = max(per_token, key=lambda k: per_token[k])
    if not per_token[worst] <= limit:
        raise ReferenceCacheError(
            f"reference cache {path} does not match the initial model: at step 0 (policy = reference) mean "
            f"|Δ_{worst}| = {per_token[worst]:.3g} nats per token, above {limit:g} (rounding: ~1e-7 fp32, ~1e-4 bf16): "
            "it holds another model's log-probs; recompute it with `python -m rao_megatron.cli.precompute_reference` "
            "or set train.reference=on_the_fly")
    return line
