"""Model-parallel state: set up Megatron's TP/PP/DP (and expert EP/ETP) groups (CPU or GPU) and read the layout."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from rao_megatron.parallel.cpu import apply_cpu_patches


def check_expert_world(world: int, tp: int, pp: int, ep: int = 1, etp: int | None = None) -> None:
    """Megatron's two layouts must both tile the world: tp x pp x dp (attention) and etp x ep x pp x edp (experts)."""
    etp = tp if etp is None else etp
    if ep < 1 or etp < 1:
        raise ValueError(f"expert_parallel={ep} and expert_tensor_parallel={etp} must be >= 1")
    if world % (etp * ep * pp):
        raise ValueError(f"world size {world} is not divisible by expert_tensor_parallel={etp} x "
                         f"expert_parallel={ep} x pipeline_parallel={pp} (= {etp * ep * pp})")


def initialize_model_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = 1234,
                              timeout_s: float = 600.0, ep: int = 1, etp: int | None = None) -> None:
    """Create Megatron's parallel groups (world = tp * pp * dp), patch for CPU when needed, seed RNGs.

    ``ep`` / ``etp``: expert parallel and expert tensor parallel sizes (MoE; ``etp`` None = ``tp``); the
    expert layout is etp x ep x pp x edp over the same ranks, EP taken from the data-parallel ranks first.
    """
    if not dist.is_initialized():
        from rao_megatron.parallel.startup import init_distributed

        init_distributed(timeout_s=timeout_s)
    world = dist.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by tensor_parallel={tp} x "
                         f"pipeline_parallel={pp} (= {tp * pp})")
    check_expert_world(world, tp, pp, ep, etp)
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


def tp_group() -> dist.ProcessGroup:
    """This rank's tensor-parallel group."""
    return ps.get_tensor_model_parallel_group()


def tp_rank() -> int:
    """Rank within the tensor-parallel group."""
    return ps.get_tensor_model_parallel_rank()


def tp_world_size() -> int:
    """Size of the tensor-parallel group."""
    return ps.get_tensor_model_parallel_world_size()


def pp_group() -> dist.ProcessGroup:
    """This rank's pipeline-parallel group."""
    return ps.get_pipeline_model_parallel_group()


def pp_rank() -> int:
    """Pipeline stage of this rank."""
    return ps.get_pipeline_model_parallel_rank()


def pp_world_size() -> int:
    """Number of pipeline stages."""
    return ps.get_pipeline_model_parallel_world_size()


def vpp_world_size() -> int | None:
    """Virtual pipeline size (model chunks per stage), None without interleaving."""
    return ps.get_virtual_pipeline_model_parallel_world_size()


def is_first_stage(vp_stage: int | None = None) -> bool:
    """Whether this rank (and model chunk ``vp_stage``) holds the embedding."""
    if vp_stage is None:
        return ps.is_pipeline_first_stage(ignore_virtual=True)
    return ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)


def is_last_stage(vp_stage: int | None = None) -> bool:
    """Whether this rank (and model chunk ``vp_stage``) holds the output layer and computes the loss."""
    if vp_stage is None:
        return ps.is_pipeline_last_stage(ignore_virtual=True)
    return ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)


def ep_world_size() -> int:
    """Size of the expert-parallel group (1 for dense models)."""
    return ps.get_expert_model_parallel_world_size()


def etp_world_size() -> int:
    """Size of the expert tensor-parallel group."""
    return ps.get_expert_tensor_parallel_world_size()


def dp_group() -> dist.ProcessGroup:
    """This rank's data-parallel group."""
    return ps.get_data_parallel_group()


def dp_rank() -> int:
    """Rank within the data-parallel group."""
    return ps.get_data_parallel_rank()


def dp_world_size() -> int:
    """Size of the data-parallel group."""
    return ps.get_data_parallel_world_size()
