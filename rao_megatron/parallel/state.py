"""Megatron's model-parallel groups: the layout rule, set up TP/PP/DP (and expert EP/ETP) groups on CPU or GPU.

One way to read the layout: Megatron's own ``megatron.core.parallel_state`` for sizes, ranks and groups
(``ps.get_tensor_model_parallel_world_size()``, ``ps.get_data_parallel_group()``, ...), and
:func:`is_first_stage` / :func:`is_last_stage` here for the pipeline-stage questions (the rank's stage
whatever the virtual pipeline, or one model chunk's). The process group comes first
(``parallel.startup.init_distributed``, or a ``parallel.launch`` worker); this module never starts one.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from rao_megatron.parallel.cpu import apply_cpu_patches


def check_world(world: int, tp: int, pp: int, ep: int = 1, etp: int | None = None, *, keys: str = "parallel.",
                error: type[Exception] = ValueError) -> None:
    """The layout rule: ``world`` ranks must tile both of Megatron's layouts over the same ranks, TP × PP × DP
    (attention) and ETP × EP × PP × EDP (experts; ``etp`` None = ``tp``).

    Raises ``error`` with a one-line message naming the settings as the caller's user writes them
    (``keys``: ``"parallel."`` for the config's ``parallel.tp``, ``"--"`` for a command's ``--tp``), the world
    size and the ways out: the number of processes to launch a multiple of, or another layout.
    """
    k = {name: f"{keys}{name}" for name in ("tp", "pp", "ep", "etp")}
    expert_tp = tp if etp is None else etp
    sizes = {"tp": tp, "pp": pp, "ep": ep, "etp": etp}
    small = [f"{k[name]}={value}" for name, value in sizes.items() if value is not None and value < 1]
    if small:
        raise error(f"{', '.join(small)}: parallel sizes must be >= 1")
    launch = pp * math.lcm(tp, expert_tp * ep)  # the smallest world that fits both layouts
    way_out = f"launch a multiple of {launch} processes (torchrun --nproc-per-node)"
    if world % (tp * pp):
        raise error(f"world size {world} is not divisible by {k['tp']} × {k['pp']} = {tp} × {pp}; {way_out}, "
                    f"or make {k['tp']} × {k['pp']} a divisor of {world}")
    if world % (expert_tp * ep * pp):
        unset = f" ({k['etp']} unset = {k['tp']})" if etp is None else ""
        raise error(f"world size {world} is not divisible by {k['etp']} × {k['ep']} × {k['pp']} = {expert_tp} × {ep} × "
                    f"{pp}{unset}: expert parallelism takes its ranks from data parallelism; {way_out}, or make "
                    f"{k['etp']} × {k['ep']} × {k['pp']} a divisor of {world}")


def initialize_model_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = 1234,
                              ep: int = 1, etp: int | None = None) -> None:
    """Create Megatron's parallel groups (world = tp * pp * dp), patch for CPU when needed, seed RNGs.

    Needs the process group (``parallel.startup.init_distributed``). ``ep`` / ``etp``: expert parallel and
    expert tensor parallel sizes (MoE; ``etp`` None = ``tp``); the expert layout is etp x ep x pp x edp over
    the same ranks, EP taken from the data-parallel ranks first.
    """
    if not dist.is_initialized():
        raise RuntimeError("Megatron's parallel groups need a process group first: call "
                           "rao_megatron.parallel.startup.init_distributed() (or run in a parallel.launch worker)")
    check_world(dist.get_world_size(), tp, pp, ep, etp)
    if vpp is not None and vpp > 1 and pp < 2:
        raise ValueError(f"virtual pipeline size {vpp} needs pipeline_parallel > 1 (got {pp})")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    # Patches must precede seeding: the RNG tracker is created by model_parallel_cuda_manual_seed.
    apply_cpu_patches()
    # Same default-generator seed on every rank, so replicated weights (e.g. a reward head) init alike.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    """Tear down Megatron's groups (the default process group stays)."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def is_first_stage(vp_stage: int | None = None) -> bool:
    """Whether this rank holds the first pipeline stage (the embedding): of any model chunk when ``vp_stage``
    is None, else of chunk ``vp_stage`` (interleaved schedule)."""
    if vp_stage is None:
        return ps.is_pipeline_first_stage(ignore_virtual=True)
    return ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)


def is_last_stage(vp_stage: int | None = None) -> bool:
    """Whether this rank holds the last pipeline stage (the output layer; it computes the loss and holds the
    step's outputs): of any model chunk when ``vp_stage`` is None, else of chunk ``vp_stage``."""
    if vp_stage is None:
        return ps.is_pipeline_last_stage(ignore_virtual=True)
    return ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
