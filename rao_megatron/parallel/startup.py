"""Process start-up: the process group (torchrun or a 1-rank one), device checks, Megatron's TP/PP/DP/EP layout."""

from __future__ import annotations

import math
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rao_megatron.config import Config, ConfigError
from rao_megatron.parallel.launch import free_port


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0, device: str = "auto") -> None:
    """Join torchrun's process group (env RANK, WORLD_SIZE, ...), or start a 1-rank one for ``python -m``.

    ``device`` (``parallel.device``) is checked against the machine first (:func:`check_device`).
    """
    check_device(device)
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def check_device(device: str = "auto") -> None:
    """``parallel.device`` as the machine allows: cuda needs a CUDA torch that sees a GPU, and CUDA needs TE.

    A GPU job must never fall back to training on the CPU: a CPU-only wheel in the job's venv (``make``
    on a login node without GPUs installs one) or a node without visible GPUs stops here, naming the
    interpreter. On CUDA the Transformer Engine spec is required (the local spec's torch norms are not
    built for CUDA / bf16 by Megatron; a silent fallback would fail at the first forward).
    """
    import importlib.util
    import sys

    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        if torch.version.cuda is None:
            why = f"torch {torch.__version__}, a CPU-only build"
        else:
            why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) but no visible GPU "
                   f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})")
        raise ConfigError(f"config key 'parallel.device' is cuda, but {sys.executable} has {why}; install the CUDA "
                          "build of torch in this environment, run on a GPU node, or set parallel.device=cpu")
    if device == "cpu" and cuda:
        raise ConfigError("config key 'parallel.device' is cpu, but this process sees CUDA devices; hide them "
                          "with CUDA_VISIBLE_DEVICES= (the sbatch scripts do with DEVICE=cpu)")
    if cuda and importlib.util.find_spec("transformer_engine") is None:
        raise ConfigError(f"CUDA run without Transformer Engine: {sys.executable} cannot import transformer_engine; "
                          "install it (pip install -e '.[gpu]', or use an NGC PyTorch container)")


def thd_attention() -> bool:
    """Packed micro-batches run as Transformer Engine's THD sequences: the TE layer spec on CUDA (compute
    device CUDA and TE importable, as ``models.provider.te_usable``); the CPU's local spec takes a mask."""
    import importlib.util

    from rao_megatron.parallel.device import compute_device

    return compute_device().type == "cuda" and importlib.util.find_spec("transformer_engine") is not None


def check_packing_dtype(cfg: Config, thd: bool | None = None) -> None:
    """Packed batches on CUDA need bf16: TE's THD attention runs on its flash or fused backends, which take
    bf16/fp16 only, and its unfused (fp32) backend does not take THD -- an fp32 packed run would stop at
    the first forward with "No dot product attention backend is available". ``thd``: None = :func:`thd_attention`.

    Refused rather than padded instead: padding changes the micro-batch layout, the throughput and what
    ``data.micro_batch_tokens`` means, which the config should say, not the device.
    """
    thd = thd_attention() if thd is None else thd
    if thd and cfg.data.packing and cfg.model.dtype == "fp32":
        raise ConfigError("data.packing=true on CUDA runs Transformer Engine's THD attention, which needs "
                          "model.dtype=bf16 (its fp32 attention takes no packed sequences); set model.dtype=bf16 "
                          "or data.packing=false")


def check_layout(cfg: Config) -> None:
    """World size must be a multiple of TP × PP and of ETP × EP × PP (Megatron's attention and expert
    layouts tile the same ranks): say so before Megatron does, in the config's words."""
    world = dist.get_world_size()
    tp, pp, ep = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep
    etp = tp if cfg.parallel.etp is None else cfg.parallel.etp
    if world % (tp * pp):
        raise ConfigError(f"world size {world} is not divisible by parallel.tp × parallel.pp = {tp} × {pp}; "
                          f"launch a multiple of {tp * pp} processes (torchrun --nproc-per-node)")
    if world % (etp * ep * pp):
        raise ConfigError(f"world size {world} is not divisible by parallel.etp × parallel.ep × parallel.pp = "
                          f"{etp} × {ep} × {pp}; expert parallelism takes its ranks from data parallelism: "
                          f"launch a multiple of {pp * math.lcm(tp, etp * ep)} processes")


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log0(*args: Any) -> None:
    """Print on global rank 0 only."""
    if is_rank0():
        print(*args, flush=True)


def start(cfg: Config) -> None:
    """Process groups and Megatron's TP/PP/DP layout for this run."""
    from rao_megatron.parallel.state import initialize_model_parallel

    init_distributed(cfg.parallel.backend, device=cfg.parallel.device)
    check_packing_dtype(cfg)
    check_layout(cfg)
    initialize_model_parallel(tp=cfg.parallel.tp, pp=cfg.parallel.pp, vpp=cfg.parallel.vpp, seed=cfg.train.seed,
                              ep=cfg.parallel.ep, etp=cfg.parallel.etp)
