"""Process start-up: the process group (torchrun or a 1-rank one), device checks, then Megatron's TP/PP/DP/EP
layout (``parallel.state``, the lower module: it never starts a process group)."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rao_megatron.config import ConfigError, ParallelConfig
from rao_megatron.parallel.device import transformer_engine_installed, transformer_engine_on_cuda
from rao_megatron.parallel.launch import free_port
from rao_megatron.parallel.state import check_world, initialize_model_parallel


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
    if cuda and not transformer_engine_installed():
        raise ConfigError(f"CUDA run without Transformer Engine: {sys.executable} cannot import transformer_engine; "
                          "install it (pip install -e '.[gpu]', or use an NGC PyTorch container)")


def check_packing_dtype(packing: bool, dtype: str, thd: bool | None = None) -> None:
    """Packed batches on CUDA need bf16 (``data.packing``, ``model.dtype``): TE's THD attention runs on its
    flash or fused backends, which take bf16/fp16 only, and its unfused (fp32) backend does not take THD -- an
    fp32 packed run would stop at the first forward with "No dot product attention backend is available".
    ``thd``: whether packed micro-batches run as THD sequences; None = TE on CUDA
    (``parallel.device.transformer_engine_on_cuda``; the CPU's local spec takes a mask).

    Refused rather than padded instead: padding changes the micro-batch layout, the throughput and what
    ``data.micro_batch_tokens`` means, which the config should say, not the device.
    """
    thd = transformer_engine_on_cuda() if thd is None else thd
    if thd and packing and dtype == "fp32":
        raise ConfigError("data.packing=true on CUDA runs Transformer Engine's THD attention, which needs "
                          "model.dtype=bf16 (its fp32 attention takes no packed sequences); set model.dtype=bf16 "
                          "or data.packing=false")


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log0(*args: Any) -> None:
    """Print on global rank 0 only."""
    if is_rank0():
        print(*args, flush=True)


def start(parallel: ParallelConfig, *, seed: int) -> None:
    """Process group (checked against ``parallel.device``) and Megatron's TP/PP/DP/EP layout for this run;
    ``seed``: the model-init seed (``train.seed``). The layout is checked in the config's words first."""
    init_distributed(parallel.backend, device=parallel.device)
    check_world(dist.get_world_size(), parallel.tp, parallel.pp, parallel.ep, parallel.etp, error=ConfigError)
    initialize_model_parallel(tp=parallel.tp, pp=parallel.pp, vpp=parallel.vpp, seed=seed, ep=parallel.ep,
                              etp=parallel.etp)
