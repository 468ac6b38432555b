"""HF <-> Megatron checkpoint conversion drivers: validate, run the ranks on CPU, write atomically.

``hf_to_megatron`` starts TP x PP forked gloo processes (``run_distributed``; more when expert
parallelism needs data-parallel ranks, :func:`conversion_world_size`); each builds its model shard,
reads only the HF tensors it needs (``LazyHFStateDict``) and writes its part of a torch_dist
checkpoint. ``megatron_to_hf`` loads any layout at TP1/PP1 in one process (dist_checkpointing
reshards) and streams the HF tensors into safetensors shards. The caller's process holds no weights.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch.multiprocessing import ProcessRaisedException
from tqdm import tqdm

import rao_megatron
from rao_megatron.conversion.hf_io import (
    DTYPES,
    TOKENIZER_FILES,
    ConversionError,
    LazyHFStateDict,
    ShardedSafetensorsWriter,
    check_output_dir,
    config_dtype,
    copy_tokenizer_files,
    hf_dtype_name,
    parse_size,
    read_hf_config,
    staged_output,
    write_json,
)
from rao_megatron.conversion.validate import (
    check_hf_tensors,
    check_layout,
    config_for_task,
    conversion_world_size,
    task_of,
)
from rao_megatron.models.checkpoint import (
    load_model_checkpoint,
    read_checkpoint_meta,
    resolve_checkpoint,
    save_model_checkpoint,
)
from rao_megatron.models.hf_config import ModelArch, transformer_config_from_hf
from rao_megatron.models.hf_mappings import mappings_for
from rao_megatron.models.hf_state import iter_mapped_params, load_hf_state_dict_into_megatron, rank_dims
from rao_megatron.models.provider import build_gpt_model
from rao_megatron.models.reward import build_reward_model
from rao_megatron.parallel.launch import run_distributed
from rao_megatron.parallel.state import destroy_model_parallel, initialize_model_parallel

#: generous: a rank may wait at a barrier while another reads or writes many GB
RANK_TIMEOUT_S = 3600.0
_USER_ERRORS = ("ConversionError", "ValueError", "KeyError", "FileNotFoundError", "WriteError", "OSError",
                "PermissionError")


def hide_gpus() -> None:
    """Make this process CPU-only: no GPU is visible to it, and torch says so.

    The conversion ranks run here. Launched where GPUs are visible (online GRAO, NeMo-Run's local
    executor, an interactive GPU node) they would otherwise build their models with
    ``use_cpu_initialization=False`` on whatever CUDA device is current, and a rank forked from a parent
    that already asked torch about CUDA could not initialise CUDA at all. ``CUDA_VISIBLE_DEVICES=""``
    hides the GPUs from CUDA itself (and from any child process); a forked rank also inherits torch's
    cached device count, so ``torch.cuda.is_available()`` / ``device_count()`` are pinned to what is now
    true for this process: no CUDA. Then Megatron initialises on the CPU and the CPU patches apply.
    """
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.cuda.is_available = _no_cuda  # type: ignore[assignment]
    torch.cuda.device_count = _no_devices  # type: ignore[assignment]


def _no_cuda() -> bool:
    return False


def _no_devices() -> int:
    return 0


def _cpu_rank(fn: Callable[..., Any], *args: Any) -> None:
    """Entry of every conversion rank: GPUs hidden before anything touches CUDA, then ``fn(*args)``."""
    hide_gpus()
    fn(*args)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Run ``fn(*args)`` on ``world_size`` forked CPU gloo ranks; a user error on a rank re-raises here.

    The ranks never use a GPU, even where the caller sees some (:func:`hide_gpus`); the caller's own
    process is left as it is."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConversionError("run the converter as a plain process, not under torchrun: it starts its own "
                              "tp x pp CPU processes")
    try:
        run_distributed(_cpu_rank, world_size, fn, *args, timeout_s=RANK_TIMEOUT_S)
    except ProcessRaisedException as e:
        # the worker's traceback arrives as text; surface its last line when it is a user error
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        m = re.match(r"^([\w.]+): (.*)$", lines[-1]) if lines else None
        if m and m.group(1).split(".")[-1] in _USER_ERRORS:
            raise ConversionError(m.group(2).strip("\"'")) from e
        raise


def build_chunks(arch: ModelArch, task: str, dtype: torch.dtype) -> list[torch.nn.Module]:
    """This rank's model (one chunk, no VPP) with uninitialised weights: they are all loaded next."""
    config = transformer_config_from_hf(arch, tp=ps.get_tensor_model_parallel_world_size(),
                                        pp=ps.get_pipeline_model_parallel_world_size(),
                                        ep=ps.get_expert_model_parallel_world_size(),
                                        etp=ps.get_expert_tensor_parallel_world_size(), params_dtype=dtype,
                                        perform_initialization=False)
    builder = build_reward_model if task == "rm" else build_gpt_model
    return [builder(arch, config=config, params_dtype=dtype)]


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled or dist.get_rank() != 0)


# ---------------------------------------------------------------- HF -> Megatron


@dataclass(frozen=True)
class _HfToMegatronJob:
    hf_dir: str
    target: str
    tp: int
    pp: int
    task: str
    dtype: str
    arch: ModelArch
    meta: dict[str, Any]
    progress: bool
    ep: int = 1
    etp: int | None = None


def _hf_to_megatron_worker(job: _HfToMegatronJob) -> None:
    initialize_model_parallel(tp=job.tp, pp=job.pp, ep=job.ep, etp=job.etp)
    chunks = build_chunks(job.arch, job.task, DTYPES[job.dtype])
    reads = sum(len(m.hf) for _, _, m, _, _ in iter_mapped_params(chunks, mappings_for(job.arch, job.task == "rm")))
    bar = _progress(reads, "reading HF tensors (rank 0)", job.progress)
    hf = LazyHFStateDict(job.hf_dir, on_read=lambda _name: bar.update())
    load_hf_state_dict_into_megatron(chunks, hf, job.arch)
    bar.close()
    save_model_checkpoint(chunks, job.target, job.meta)
    destroy_model_parallel()


def hf_to_megatron(hf_dir: str | os.PathLike, out: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                   ep: int = 1, etp: int | None = None, dtype: str = "auto", task: str | None = None,
                   progress: bool = True) -> Path:
    """Convert an HF safetensors model directory into a Megatron torch_dist checkpoint at ``out``.

    ``task``: 'policy' or 'rm' (default: 'rm' for ``*ForSequenceClassification``); an RM converted from
    a causal LM keeps a freshly initialised scalar head. ``dtype``: fp32, bf16 or auto (the config's).
    ``ep`` / ``etp``: expert parallel / expert tensor parallel sizes the ranks write at (MoE); the
    checkpoint is reshardable, so any layout reads it.
    """
    hf_dir = Path(hf_dir).resolve()
    source = read_hf_config(hf_dir)
    task = task or task_of(source)
    cfg = config_for_task(source, task)
    arch = check_layout(cfg, tp, pp, ep, etp)  # the architecture, parsed once
    new_head = check_hf_tensors(LazyHFStateDict(hf_dir).shapes(), arch, task, where=f"HF checkpoint {hf_dir}")
    out = check_output_dir(out).resolve()
    dtype = dtype if dtype != "auto" else ("bf16" if config_dtype(cfg) == torch.bfloat16 else "fp32")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected fp32, bf16 or auto")
    has_tokenizer = any((hf_dir / n).is_file() for n in TOKENIZER_FILES)
    meta = {
        "hf_config": cfg,
        "task": task,
        "dtype": dtype,
        # training loads the tokenizer from here (model.init_checkpoint); copied in below
        "tokenizer": str(out / "tokenizer") if has_tokenizer else None,
        "generation_config": _read_json(hf_dir / "generation_config.json"),
        "provenance": {"converter": "rao_megatron.cli.convert hf-to-megatron", "source": str(hf_dir),
                       "written_at_layout": {"tp": tp, "pp": pp, **({"ep": ep, "etp": tp if etp is None else etp}
                                                                   if arch.moe is not None else {})},
                       "rao_megatron": rao_megatron.__version__,
                       "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "new_reward_head": bool(new_head)},
    }
    with staged_output(out) as target:
        run_ranks(_hf_to_megatron_worker, conversion_world_size(tp, pp, ep, etp),
                  _HfToMegatronJob(str(hf_dir), str(target), tp, pp, task, dtype, arch, meta, progress, ep, etp))
        copy_tokenizer_files(hf_dir, target / "tokenizer")
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------- Megatron -> HF


def iter_hf_tensors(chunks: list[torch.nn.Module], arch: ModelArch, task: str,
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every parameter of a TP1/PP1 model, one at a time (views, no copies)."""
    if ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1 or \
            ps.get_expert_model_parallel_world_size() != 1 or ps.get_expert_tensor_parallel_world_size() != 1:
        raise ValueError("iter_hf_tensors needs the whole model on one rank (TP1 PP1 EP1)")
    dims = rank_dims(arch)
    tied = any(getattr(c, "share_embeddings_and_output_weights", False) for c in chunks)
    for name, param, mapping, layer, expert in iter_mapped_params(chunks, mappings_for(arch, task == "rm"), dims):
        if tied and name == "output_layer.weight":
            continue  # the tied embedding, exported once as model.embed_tokens.weight
        yield from zip(mapping.hf_names(layer, expert), mapping.to_hf([param.detach()], dims), strict=True)


@dataclass(frozen=True)
class _MegatronToHfJob:
    checkpoint: str
    target: str
    task: str
    stored_dtype: str
    out_dtype: str
    arch: ModelArch
    max_shard_bytes: int
    progress: bool


def _megatron_to_hf_worker(job: _MegatronToHfJob) -> None:
    initialize_model_parallel(tp=1, pp=1)
    chunks = build_chunks(job.arch, job.task, DTYPES[job.stored_dtype])
    load_model_checkpoint(chunks, job.checkpoint, strict=True)
    total = sum(1 for _ in iter_hf_tensors(chunks, job.arch, job.task))
    writer = ShardedSafetensorsWriter(job.target, job.max_shard_bytes)
    for name, tensor in tqdm(iter_hf_tensors(chunks, job.arch, job.task), total=total, unit="tensor",
                             desc="writing HF tensors", disable=not job.progress):
        writer.add(name, tensor, dtype=DTYPES[job.out_dtype])
    writer.close()
    destroy_model_parallel()


def _generation_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """What transformers derives from a model config when a model has no generation_config.json."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {"_from_model_config": True, **{k: cfg[k] for k in keys if cfg.get(k) is not None}}


def megatron_to_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "auto",
                   max_shard_size: str | int = "2GB", progress: bool = True) -> Path:
    """Export a Megatron model checkpoint (any TP/PP layout) to an HF safetensors directory at ``out``.

    The task (policy -> ``*ForCausalLM``, rm -> ``*ForSequenceClassification``) comes from the
    checkpoint's metadata; ``dtype`` auto keeps the stored dtype.
    """
    checkpoint = resolve_checkpoint(checkpoint).resolve()  # also a training run's checkpoints root / latest
    meta = read_checkpoint_meta(checkpoint)
    if "hf_config" not in meta:
        raise ConversionError(f"{checkpoint}: the checkpoint metadata has no hf_config")
    task = "rm" if meta.get("task") == "rm" else "policy"
    cfg = config_for_task(meta["hf_config"], task)
    arch = ModelArch.from_hf(cfg)
    stored = meta.get("dtype") or ("bf16" if config_dtype(cfg) == torch.bfloat16 else "fp32")
    out_dtype = stored if dtype == "auto" else dtype
    if out_dtype not in DTYPES or stored not in DTYPES:
        raise ConversionError(f"--dtype {out_dtype!r}: expected fp32, bf16 or auto")
    max_bytes = parse_size(max_shard_size)
    out = check_output_dir(out).resolve()
    with staged_output(out) as target:
        run_ranks(_megatron_to_hf_worker, 1,
                  _MegatronToHfJob(str(checkpoint), str(target), task, stored, out_dtype, arch, max_bytes, progress))
        out_cfg = dict(cfg, dtype=hf_dtype_name(DTYPES[out_dtype]))
        if "torch_dtype" in out_cfg:
            out_cfg["torch_dtype"] = out_cfg["dtype"]
        write_json(target / "config.json", out_cfg)
        if task == "policy":
            write_json(target / "generation_config.json", meta.get("generation_config") or _generation_config(cfg))
        # the converter puts a copy inside the checkpoint; a training run records its tokenizer path
        tokenizer_src = checkpoint / "tokenizer" if (checkpoint / "tokenizer").is_dir() else meta.get("tokenizer")
        if not copy_tokenizer_files(tokenizer_src, target):
            print(f"note: no tokenizer found for {checkpoint}; copy the tokenizer files into {out} yourself")
    return out
