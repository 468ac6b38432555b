"""One device rule: everything a step builds or loads lives on the model's device.

The compute device is ``cuda:<current>`` when the run uses CUDA and the CPU otherwise (gloo runs,
tests, conversion). Models are moved there right after they are built (as Megatron-LM's ``get_model``
does); batches, cached reference log-probs, rewards and masks are moved by :func:`to_device` before
the schedule sees them; tensors handed to collectives are created with ``device=compute_device()``, so
NCCL always gets CUDA tensors and gloo CPU ones.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Any

import torch

from rao_megatron.parallel.cpu import cpu_patches_applied

_forced: torch.device | None = None


def compute_device() -> torch.device:
    """The device models, batches and collective buffers of this process live on."""
    if _forced is not None:
        return _forced

    if torch.cuda.is_available() and not cpu_patches_applied():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def transformer_engine_installed() -> bool:
    """``transformer_engine`` can be imported here (looked up, not imported)."""
    return importlib.util.find_spec("transformer_engine") is not None


def transformer_engine_on_cuda() -> bool:
    """Models here run Transformer Engine layers: the compute device is CUDA and TE imports.

    The one condition behind the TE layer spec (``models.provider``), Megatron's fused kernels
    (``models.hf_config.fusion_settings``) and packed micro-batches as THD sequences
    (``parallel.startup.check_packing_dtype``); the start-up checks refuse CUDA without TE
    (``parallel.startup.check_device``). On the CPU the local spec runs, with an explicit attention mask.
    """
    return transformer_engine_installed() and compute_device().type == "cuda"  # without TE, CUDA is not asked


def force_compute_device(device: torch.device | str | None) -> None:
    """Pin :func:`compute_device` (``None`` restores the automatic choice).

    For tests: with ``torch.device("meta")`` every tensor that follows the rule is visibly off the CPU,
    so a CPU run can show which tensors ignore it.
    """
    global _forced
    _forced = torch.device(device) if device is not None else None


def to_device(obj: Any, device: torch.device | None = None) -> Any:
    """``obj`` with every tensor (inside dicts, lists and tuples) on ``device`` (default: the compute device)."""
    device = device or compute_device()
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=device.type == "cuda")
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def move_modules(modules: Iterable[torch.nn.Module], device: torch.device | None = None) -> None:
    """Move every parameter and buffer of ``modules`` to ``device`` (default: the compute device), in place."""
    device = device or compute_device()
    for m in modules:
        m.to(device)
