"""The run's reference log-probs from a cache: what binds a cache to the run, where it lives, opening and
checking it at start-up, computing it (``precompute_reference``), and the step-0 guard.

A cache is bound (:func:`reference_fingerprints`) to the reference model's content, the tokenizer, the
length policy, dtype / log-prob precision, and the tokenized sequences of each data file (rewards play no
part). The file format, the fingerprint hashes and the checks on one file are :mod:`.reference_cache`'s.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from tqdm import tqdm

from rao_megatron.config import Config
from rao_megatron.data import PAD_GROUP, sequence_key
from rao_megatron.data.tokenizer import pad_id
from rao_megatron.models.checkpoint import resolve_checkpoint
from rao_megatron.models.hf_config import ModelArch
from rao_megatron.parallel.device import compute_device
from rao_megatron.parallel.startup import is_rank0, log0
from rao_megatron.parallel.state import is_last_stage
from rao_megatron.training import run_data
from rao_megatron.training.engine import sequence_logps
from rao_megatron.training.reference_cache import (
    ReferenceCache,
    check_coverage,
    checkpoint_content_id,
    config_content_id,
    default_cache_path,
    delta_check,
    sequences_fingerprint,
    tokenizer_fingerprint,
    write_cache,
)

BLOCK = 8  # precompute: micro-batches per pipeline schedule call, amortises the pipeline bubble


def model_identity(cfg: Config, arch: ModelArch) -> tuple[str, str]:
    """``(content id, source)`` of the reference model (the initial policy): the resolved checkpoint's
    content (:func:`~rao_megatron.training.reference_cache.checkpoint_content_id`), not its path; for a
    random init, the architecture and the seed. Reads up to 1 MiB per checkpoint file: call it once."""
    if cfg.model.init_checkpoint:
        path = resolve_checkpoint(cfg.model.init_checkpoint).resolve()
        return checkpoint_content_id(path), str(path)
    return (config_content_id(arch.hf_dict, cfg.train.seed),
            f"random init of {cfg.model.hf_config or cfg.model.preset}, seed {cfg.train.seed}")


def file_sequences(groups: list[Any], where: dict[int, str]) -> list[tuple[int, str]]:
    """``(sequence key, row label)`` of every tokenized sequence of one data file's groups."""
    return [(sequence_key(g.prompt_ids, y), where.get(g.row, f"row {g.row}")) for g in groups for y in g.responses]


def reference_fingerprints(cfg: Config, tokenizer: Any, model: tuple[str, str],
                           groups: list[Any]) -> tuple[dict[str, str], dict[str, str]]:
    """``(strict fingerprints, recorded info)`` a reference cache of ``groups`` (one data file) is bound to:
    the model's content (``model`` from :func:`model_identity`), tokenizer, length policy, dtype and
    log-prob precision, and the tokenized sequences (not the rewards); info: log-prob implementation and
    the model's source."""
    fp = {"data": sequences_fingerprint(sequence_key(g.prompt_ids, y) for g in groups for y in g.responses),
          "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": str(cfg.data.max_length),
          "overlength": cfg.data.overlength, "model": model[0], "dtype": cfg.model.dtype,
          "logprob_precision": cfg.model.logprob_precision}
    info = {"info_logprob_impl": cfg.model.logprob_impl, "info_model_source": model[1]}
    return fp, info


def reference_cache_path(cfg: Config, data_path: str, *, heldout: bool = False) -> Path:
    """``data.reference_cache`` (the training file's cache; the held-out file's goes beside it as
    ``<name>.heldout.safetensors``), else the default path beside each data file."""
    if cfg.data.reference_cache:
        p = Path(cfg.data.reference_cache)
        return p.with_name(f"{p.stem}.heldout{p.suffix}") if heldout else p
    return default_cache_path(data_path)


def open_reference_caches(cfg: Config, tokenizer: Any, model: tuple[str, str],
                          groups: run_data.RunGroups) -> tuple[ReferenceCache | None, ReferenceCache | None]:
    """The run's (training, held-out) caches, checked against the run (``model``: :func:`model_identity`)
    and covering every one of its sequences; ``(None, None)`` when the reference is computed on the fly."""
    train_path = reference_cache_path(cfg, cfg.data.train_path)
    if cfg.train.reference == "auto" and not train_path.exists():
        log0(f"no reference cache at {train_path}: computing reference log-probs on the fly")
        return None, None
    caches = []
    for data_path, file_groups in groups.files(cfg):
        heldout = data_path != cfg.data.train_path or len(caches) > 0
        path = reference_cache_path(cfg, data_path, heldout=heldout)
        expected, info = reference_fingerprints(cfg, tokenizer, model, file_groups)
        cache = ReferenceCache(path, expected, info, warn=log0)
        check_coverage(cache, file_sequences(file_groups, groups.where.get(data_path, {})), data_path, note=log0)
        caches.append(cache)
    return caches[0], caches[-1]


def compute_file_cache(cfg: Config, tokenizer: Any, chunks: Any, arch: ModelArch, groups: list[Any], data_path: str,
                       out_path: str | Path, *, identity: tuple[dict[str, str], dict[str, str]]) -> int:
    """Forward-only pass over ``groups`` (one data file, in data order); rank 0 writes the cache for
    ``data_path`` with ``identity`` (:func:`reference_fingerprints`). Collective. Returns sequences written."""
    dp = ps.get_data_parallel_world_size()
    batcher = run_data.group_batcher(cfg, groups, source=data_path, pad_id=pad_id(tokenizer),
                                     dp_rank=ps.get_data_parallel_rank(), dp_size=dp, arch=arch)
    settings = run_data.logprob_settings(cfg)
    keep_results = is_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    keys: list[int] = []
    prompt: list[float] = []
    response: list[float] = []
    microbatches = list(batcher.iter_eval_microbatches())
    bar = tqdm(total=len(microbatches), disable=not is_rank0(), desc=f"reference log-probs ({data_path})",
               dynamic_ncols=True)
    for start in range(0, len(microbatches), BLOCK):
        block = microbatches[start:start + BLOCK]
        sums = sequence_logps(chunks, block, vocab_size=arch.vocab_size, settings=settings)
        if keep_results:
            for mb, (p, r) in zip(block, sums):
                real = mb["group_ids"] != PAD_GROUP
                keys += mb["seq_keys"][real].tolist()
                prompt += p[real].tolist()
                response += r[real].tolist()
        bar.update(len(block))
    bar.close()
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (keys, prompt, response) if keep_results else None)
    count = 0
    if is_rank0():
        all_keys, all_p, all_r = [], [], []
        for part in parts:
            if part is not None:
                all_keys += part[0]
                all_p += part[1]
                all_r += part[2]
        fingerprints, info = identity
        extra = {**info, "info_created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "info_layout": f"tp{cfg.parallel.tp}-pp{cfg.parallel.pp}-dp{dp}"}
        write_cache(out_path, all_keys, all_p, all_r, fingerprints, extra)
        count = len(set(all_keys))
    dist.barrier()
    return count


@torch.no_grad()
def step0_reference_check(chunks: Any, batcher: Any, *, vocab_size: int, settings: Any) -> str:
    """Last guard of a cached reference: the policy at step 0 is the reference, so its log-probs of the
    first step's worth of training sequences must match the cache to rounding. Returns the log line;
    raises :class:`ReferenceCacheError` above the limit. Collective: every rank calls it."""
    count = max(1, getattr(batcher, "micro_batches_per_step", 1))
    microbatches = list(itertools.islice(batcher.iter_eval_microbatches(), count))
    sums = sequence_logps(chunks, microbatches, vocab_size=vocab_size, settings=settings)
    acc = torch.zeros(5, dtype=torch.float64)  # Σ|Δ_R|, Σ|Δ_P|, response tokens, prompt tokens, sequences
    if is_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
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
