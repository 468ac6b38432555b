"""What keeps a long run alive: preemption -> checkpoint -> requeue, and the non-finite guard."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

from rao_megatron.parallel.device import compute_device

#: written to ``train.output_dir`` when a run stops for preemption (holds the step); removed on restart
PREEMPTED_MARKER = "PREEMPTED"


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Preempted(Exception):
    """The run was asked to stop (SIGTERM/SIGUSR1) and saved a checkpoint."""


def fault_steps() -> set[int]:
    """Steps whose loss is made NaN: ``RAO_FAULT_NAN_STEPS=3,4`` (a test aid for the non-finite guard)."""
    raw = os.environ.get("RAO_FAULT_NAN_STEPS", "")
    return {int(x) for x in raw.split(",") if x.strip()}


def grads_finite(chunks: list[torch.nn.Module]) -> bool:
    """Whether every gradient of every rank is finite: sums stay on the device, one all-reduce, one host sync."""
    sums = []
    for chunk in chunks:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is not None:
                sums.append(g.detach().sum(dtype=torch.float32).reshape(1))
    bad = torch.zeros(1, device=compute_device())
    if sums:  # the sum of a tensor with an inf or nan is not finite
        bad = (~torch.isfinite(torch.cat(sums).to(bad.device).sum())).float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


class PreemptionHandler:
    """Turns SIGTERM / SIGUSR1 into a flag checked at step boundaries (agreed on by all ranks)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self._flag = False
        self._saved: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self._flag = True

    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self._flag else 0.0], device=compute_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
