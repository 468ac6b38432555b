"""The engine: build this rank's model chunks (wrapped in Megatron DDP) and run the pipeline schedule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from rao_megatron.data.packing import is_packed
from rao_megatron.models.provider import build_gpt_model, enable_hidden_state_output, uses_thd
from rao_megatron.models.reward import build_reward_model
from rao_megatron.parallel.device import compute_device, move_modules, to_device


def use_distributed_optimizer(setting: bool | None = None) -> bool:
    """Shard optimizer states over DP ranks (Megatron's distributed optimizer)? None: on CUDA yes, on CPU no."""
    return compute_device().type == "cuda" if setting is None else setting


def build_model_chunks(hf_config: Any, *, task: str = "policy", params_dtype: torch.dtype = torch.float32,
                       wrap_ddp: bool = True, use_te: bool | None = None, sequence_parallel: bool = False,
                       distributed_optimizer: bool | None = None) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage) for ``task`` in policy / sft / rm / reference.

    Policy-like models return final hidden states at the last stage (the log-prob kernel multiplies by
    the vocab shard itself and all-reduces its hidden-state gradient over TP); the reward model returns
    one value per token. Chunks are moved to the compute device once built. Training models are wrapped
    in Megatron DDP (buffers laid out for ``distributed_optimizer``); a reference model is not.
    """
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    stages = [None] if vpp is None else list(range(vpp))
    chunks: list[torch.nn.Module] = []
    for v in stages:
        if task == "rm":
            model = build_reward_model(hf_config, vp_stage=v, use_te=use_te, params_dtype=params_dtype,
                                       sequence_parallel=sequence_parallel)
        else:
            model = build_gpt_model(hf_config, vp_stage=v, use_te=use_te, params_dtype=params_dtype,
                                    sequence_parallel=sequence_parallel)
            enable_hidden_state_output(model, vocab_parallel_consumer=False)
        chunks.append(model)
    if params_dtype != torch.float32:
        # The local spec builds its norms as plain torch modules in fp32 whatever params_dtype says (the TE
        # spec follows it). Cast every parameter -- not the buffers: RoPE's inv_freq stays fp32 -- so the
        # model is all params_dtype, as Megatron's mixed-precision optimizers and checkpoints expect.
        for m in chunks:
            for p in m.parameters():
                if p.dtype == torch.float32:
                    p.data = p.data.to(params_dtype)
    move_modules(chunks)
    if task == "reference" or not wrap_ddp:
        for m in chunks:
            m.requires_grad_(task != "reference")
            if task == "reference":
                m.eval()
        return chunks
    # the DDP buffers must be laid out for the optimizer that will own them (Megatron asserts they agree)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=use_distributed_optimizer(
                                                   distributed_optimizer))
    wrapped = [DistributedDataParallel(m.config, ddp_config, m) for m in chunks]
    cfg = wrapped[0].config
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def forward_backward(chunks: Sequence[torch.nn.Module] | torch.nn.Module, step: Any,
                     microbatches: Sequence[dict[str, Tensor]], *, forward_only: bool = False) -> list[dict[str, Any]]:
    """Run the (pipelined) schedule over ``microbatches``; returns each micro-batch's reduced outputs.

    The outputs exist on the last pipeline stage only (an empty list elsewhere). ``step`` is one of the
    forward steps of :mod:`rao_megatron.training.forward_step`; when it has a ``grad_scale`` it is set
    to (micro-batches × data-parallel size) here, undoing Megatron's own averaging (see that module).
    With DDP-wrapped chunks the schedule ends by calling ``finalize_model_grads`` (DP all-reduce, tied
    embedding sync across pipeline stages).
    """
    chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]  # keep the DDP wrappers
    if not microbatches:
        raise ValueError("no micro-batches to run")
    microbatches = to_device(list(microbatches))  # no copy for batches already there
    rows, seq_length = microbatches[0]["tokens"].shape
    for i, mb in enumerate(microbatches):
        if tuple(mb["tokens"].shape) != (rows, seq_length):
            raise ValueError(f"micro-batch {i} has shape {tuple(mb['tokens'].shape)}; pipeline parallelism needs "
                             f"every micro-batch at ({rows}, {seq_length})")
    if is_packed(microbatches[0]) and uses_thd(chunks[0]):
        rows, seq_length = 1, rows * seq_length  # the forward step runs packed rows as one THD sequence
    if hasattr(step, "grad_scale"):
        step.grad_scale = float(len(microbatches) * ps.get_data_parallel_world_size())
    iterators: Any = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    for c in chunks:
        c.train(not forward_only)
    with torch.set_grad_enabled(not forward_only):
        return get_forward_backward_func()(
            forward_step_func=step, data_iterator=iterators, model=list(chunks),
            num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=rows,
            decoder_seq_length=seq_length, forward_only=forward_only)


def sequence_logps(chunks: Sequence[torch.nn.Module] | torch.nn.Module, microbatches: Sequence[dict[str, Tensor]],
                   *, vocab_size: int, settings: Any = None) -> list[tuple[Tensor, Tensor]]:
    """Forward only: ``(P(x) [B], R(y) [B])`` per micro-batch, on the last pipeline stage (else ``[]``)."""
    from rao_megatron.training.forward_step import LogprobSettings, LogprobStep

    step = LogprobStep(vocab_size=vocab_size, logprobs=settings or LogprobSettings())
    outputs = forward_backward(chunks, step, microbatches, forward_only=True)
    return [(o["prompt_logps"], o["response_logps"]) for o in outputs]


def attach_reference_logps(ref_chunks: Sequence[torch.nn.Module], microbatches: Sequence[dict[str, Tensor]],
                           *, vocab_size: int, settings: Any = None) -> None:
    """On-the-fly reference: fill ``ref_prompt_logps`` / ``ref_logps`` of each micro-batch from a frozen model.

    Only the last pipeline stage computes the loss, so only there are the entries set.
    """
    for mb, (prompt, response) in zip(microbatches, sequence_logps(ref_chunks, microbatches,
                                                                   vocab_size=vocab_size, settings=settings)):
        mb["ref_prompt_logps"] = prompt
        mb["ref_logps"] = response
