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

from rao_megatron.data.packing import is_packed, padding_like
from rao_megatron.models.hf_config import ModelArch
from rao_megatron.models.lora import LoraSpec, apply_lora, freeze_base
from rao_megatron.models.provider import build_gpt_model, enable_hidden_state_output, uses_thd
from rao_megatron.models.reward import build_reward_model
from rao_megatron.parallel.device import compute_device, move_modules, to_device
from rao_megatron.training.forward_step import LogprobSettings, LogprobStep


def use_distributed_optimizer(setting: bool | None = None) -> bool:
    """Shard optimizer states over DP ranks (Megatron's distributed optimizer)? None: on CUDA yes, on CPU no."""
    return compute_device().type == "cuda" if setting is None else setting


def ddp_config(distributed_optimizer: bool, *, interleaved: bool = False) -> DistributedDataParallelConfig:
    """Megatron DDP settings for this process's compute device.

    CUDA: gradients are reduced (reduce-scattered with the distributed optimizer) bucket by bucket while the
    backward pass still runs (``overlap_grad_reduce``), in buckets of Megatron's default size (None:
    max(40M, 1M x DP) elements, ``DistributedDataParallel.__init__``); with the distributed optimizer
    the updated parameter shards are all-gathered bucket by bucket in the next forward pass (forward
    pre-hooks, ``overlap_param_gather``), launched together on every pipeline stage under the interleaved
    schedule (``align_param_gather``: Megatron-LM turns it off without virtual pipeline stages, where the
    schedule never calls ``param_sync_func`` and the pre-hooks chain the buckets themselves). These are
    Megatron-LM's ``--overlap-grad-reduce --overlap-param-gather``. Parameters read between an optimizer
    step and the next forward (a checkpoint) need :func:`sync_params` first.
    CPU (gloo): one synchronous reduction after the backward pass, no buckets.
    Gradients are reduced in fp32 either way.
    """
    cuda = compute_device().type == "cuda"
    gather = cuda and distributed_optimizer
    return DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=cuda,
                                         overlap_param_gather=gather, align_param_gather=gather and interleaved,
                                         use_distributed_optimizer=distributed_optimizer, bucket_size=None)


def sync_params(chunks: Sequence[torch.nn.Module]) -> None:
    """All-gather the parameters now where DDP would only do it in the next forward pass.

    With ``overlap_param_gather`` the distributed optimizer updates only this rank's shard; the other
    ranks' shards arrive with the next forward's pre-hooks. A checkpoint written between the two would
    hold stale weights, so it calls this first (Megatron-LM syncs the same way, via
    ``disable_forward_pre_hook(param_sync=True)``, around ``save_checkpoint``). A no-op otherwise.
    """
    for chunk in chunks:
        cfg = getattr(chunk, "ddp_config", None)
        if cfg is not None and cfg.use_distributed_optimizer and cfg.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def build_model_chunks(arch: ModelArch, *, task: str = "policy", params_dtype: torch.dtype = torch.float32,
                       wrap_ddp: bool = True, use_te: bool | None = None, sequence_parallel: bool = False,
                       distributed_optimizer: bool | None = None, lora: LoraSpec | None = None,
                       lora_seed: int = 0) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage) for ``task`` in policy / sft / rm / reference.

    Policy-like models return final hidden states at the last stage (the log-prob kernel multiplies by
    the vocab shard itself and all-reduces its hidden-state gradient over TP); the reward model returns
    one value per token. Chunks are moved to the compute device once built. Training models are wrapped
    in Megatron DDP (buffers laid out for ``distributed_optimizer``); a reference model is not.
    With ``lora`` every chunk gets LoRA adapters (:func:`~rao_megatron.models.lora.apply_lora`, seeded by
    ``lora_seed``) and only they are trained (and a reward model's head): DDP and the optimizer see nothing else.
    """
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    stages = [None] if vpp is None else list(range(vpp))
    grouped = lora is None or not lora.experts  # LoRA adapts experts one TE/local linear at a time
    chunks: list[torch.nn.Module] = []
    for v in stages:
        if task == "rm":
            model = build_reward_model(arch, vp_stage=v, use_te=use_te, params_dtype=params_dtype,
                                       sequence_parallel=sequence_parallel, grouped_experts=grouped)
        else:
            model = build_gpt_model(arch, vp_stage=v, use_te=use_te, params_dtype=params_dtype,
                                    sequence_parallel=sequence_parallel, grouped_experts=grouped)
            enable_hidden_state_output(model, vocab_parallel_consumer=False)
        if lora is not None:
            apply_lora(model, lora, seed=lora_seed)
            freeze_base(model, trainable=("output_layer.",) if task == "rm" else ())
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
            if task == "reference":
                m.requires_grad_(False)
                m.eval()
        return chunks
    # the DDP buffers must be laid out for the optimizer that will own them (Megatron asserts they agree)
    settings = ddp_config(use_distributed_optimizer(distributed_optimizer), interleaved=len(chunks) > 1)
    # as Megatron-LM's get_model: buckets for the first chunk only (the later chunks' communication
    # overlaps with the interleaved schedule's compute anyway)
    wrapped = [DistributedDataParallel(m.config, settings, m, disable_bucketing=i > 0) for i, m in enumerate(chunks)]
    cfg = wrapped[0].config  # the config the pipeline schedule reads

    def per_chunk(name: str) -> Any:
        funcs = [getattr(w, name) for w in wrapped]
        return funcs if len(funcs) > 1 else funcs[0]

    # what Megatron-LM's train() sets for the schedule
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = per_chunk("no_sync")
    if settings.overlap_grad_reduce:  # launch each chunk's reduction as its last backward ends (align_grad_reduce)
        cfg.grad_sync_func = per_chunk("start_grad_sync")
    if settings.overlap_param_gather and settings.align_param_gather:
        cfg.param_sync_func = per_chunk("start_param_sync")
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
    given = len(microbatches)
    # the interleaved schedule runs micro-batches in groups of PP per virtual stage: a step that packs into
    # fewer (short data, shared prompts) gets all-padding ones, which the loss skips
    short = ps.get_pipeline_model_parallel_world_size() - given if len(chunks) > 1 else 0
    microbatches = list(microbatches) + [padding_like(microbatches[0]) for _ in range(max(short, 0))]
    microbatches = to_device(microbatches)  # no copy for batches already there
    rows, seq_length = microbatches[0]["tokens"].shape
    for i, mb in enumerate(microbatches):
        if tuple(mb["tokens"].shape) != (rows, seq_length):
            raise ValueError(f"micro-batch {i} has shape {tuple(mb['tokens'].shape)}; pipeline parallelism needs "
                             f"every micro-batch at ({rows}, {seq_length})")
    if is_packed(microbatches[0]) and uses_thd(chunks[0]):
        rows, seq_length = 1, rows * seq_length  # the forward step runs packed rows as one THD sequence
    if hasattr(step, "grad_scale"):
        step.grad_scale = float(len(microbatches) * ps.get_data_parallel_world_size())
    order = list(range(len(microbatches))) if forward_only else empty_first(microbatches)
    microbatches = [microbatches[i] for i in order]
    iterators: Any = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    for c in chunks:
        c.train(not forward_only)
    with torch.set_grad_enabled(not forward_only):
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iterators, model=list(chunks),
            num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=rows,
            decoder_seq_length=seq_length, forward_only=forward_only)
    if len(outputs) != len(order):  # not the last pipeline stage: no outputs
        return outputs[:given]
    restored: list[Any] = [None] * len(outputs)
    for position, i in enumerate(order):
        restored[i] = outputs[position]
    return restored[:given]


def empty_first(microbatches: Sequence[dict[str, Tensor]]) -> list[int]:
    """The order a training pass runs ``microbatches`` in: the empty ones (no sequences, the padding a DP rank
    runs under expert parallelism) first, the rest as given; outputs are returned in the callers' order.

    With ``overlap_grad_reduce`` (CUDA) Megatron's DDP launches a bucket's reduction once every parameter
    in it has its gradient from the last micro-batch, and expects the same parameters every step. An
    empty micro-batch's zero loss does not reach a weight used only by the loss (an untied output layer,
    read by the log-prob kernel), so run last it would leave that bucket's reduction unlaunched: Megatron
    fails an assertion at the next step (megatron-core 0.16.1, ``_ParamAndGradBucketGroup.reset`` or
    "Communication call has not been issued for this bucket"). Only the summation order of the accumulated
    gradients changes (an empty micro-batch adds zeros, or MoE load-balancing gradients of its padding tokens).
    """
    def empty(mb: dict[str, Tensor]) -> bool:
        return "group_ids" in mb and mb["group_ids"].numel() == 0  # a shape: no device sync

    return sorted(range(len(microbatches)), key=lambda i: not empty(microbatches[i]))


def sequence_logps(chunks: Sequence[torch.nn.Module] | torch.nn.Module, microbatches: Sequence[dict[str, Tensor]],
                   *, vocab_size: int, settings: Any = None) -> list[tuple[Tensor, Tensor]]:
    """Forward only: ``(P(x) [B], R(y) [B])`` per micro-batch, on the last pipeline stage (else ``[]``)."""
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
