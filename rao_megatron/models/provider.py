"""Build a Megatron-Core ``GPTModel`` from an HF config; expose final hidden states and the output weight."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from rao_megatron.models.hf_config import (
    ModelArch,
    llama3_inv_freq,
    padded_vocab_size,
    transformer_config_from_hf,
)
from rao_megatron.parallel.compat import moe_router_gemm_without_te
from rao_megatron.parallel.device import transformer_engine_on_cuda
from rao_megatron.parallel.state import is_first_stage, is_last_stage


def layer_spec(config: TransformerConfig, use_te: bool | None = None) -> Any:
    """TE layer spec on CUDA with TE (``use_te`` None: :func:`~rao_megatron.parallel.device.transformer_engine_on_cuda`),
    else the local (pure PyTorch) spec; same parameters either way.

    MoE (``num_moe_experts``): TE's grouped-GEMM experts with TE when ``config.moe_grouped_gemm``, else
    one local MLP per expert (``SequentialMLP``); q/k norms with ``config.qk_layernorm`` (Qwen3).
    """
    if use_te is None:
        use_te = transformer_engine_on_cuda()
    moe = {"num_experts": config.num_moe_experts, "qk_layernorm": config.qk_layernorm}
    if use_te:
        # TE: needs transformer_engine
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(moe_grouped_gemm=config.moe_grouped_gemm, **moe)
    spec = get_gpt_layer_local_spec(normalization=config.normalization, moe_grouped_gemm=False, **moe)
    spec.submodules.self_attention.submodules.core_attention = SdpaDotProductAttention
    return spec


class SdpaDotProductAttention(DotProductAttention):
    """The local spec's core attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Megatron's ``DotProductAttention`` materializes the ``[b, heads, sq, sk]`` scores, masks, soft-maxes and
    multiplies them in separate passes; PyTorch's SDPA runs the same math in one fused kernel (on the CPU its
    flash-style blocked kernel, which takes a boolean mask), several times faster for long rows and without
    keeping the scores for backward. Same inputs and outputs: ``[s, b, heads, d]`` in, ``[sq, b, heads x d]``
    out; ``attention_mask`` True = masked (Megatron's convention: our packed and shared-prompt masks), None =
    causal for a causal layer. Anything SDPA does not express here -- attention dropout while training, sliding
    windows, query-key layer scaling, learned softmax offsets, packed THD parameters, a bias -- runs Megatron's
    own path.
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: Any = None, attention_bias: Any = None,
                packed_seq_params: Any = None) -> torch.Tensor:
        causal = self.attn_mask_type == AttnMaskType.causal
        if (packed_seq_params is not None or attention_bias is not None or self.softmax_offset is not None
                or (self.training and self.attention_dropout.p > 0) or self.config.apply_query_key_layer_scaling
                or self.scale_mask_softmax.window_size is not None or (attention_mask is None and not causal)):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        sq, b, heads, _ = query.shape
        groups = heads // key.shape[2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=sq == k.shape[2], scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


def uses_thd(model: torch.nn.Module) -> bool:
    """Whether packed micro-batches run this model as one THD sequence (it was built with the TE spec)."""
    return bool(getattr(unwrap_model(model), "built_with_te", False))


@contextlib.contextmanager
def rope_at_positions(model: torch.nn.Module, position_ids: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``model``'s rotary embedding rotates each token by its own ``position_ids[B, S]``
    instead of its place in the row.

    ``GPTModel`` builds RoPE from the row length alone (``rotary_pos_emb(seq_len)``: token t at position t) and
    reads ``position_ids`` only for learned position embeddings. That is exact for rows that hold whole
    sequences one after another (RoPE sees only distances within a sequence), not for the shared-prompt layout
    (``data.packing``), where every response of a group follows the prompt at the same positions although the
    responses sit one after another in the row. The frequencies are the module's own ``inv_freq`` (Llama-3
    scaling already applied at build time) and its interpolation factor, laid out as ``RotaryEmbedding.get_emb``
    lays them (halves or interleaved), one row per batch entry: ``[S, B, 1, D]``, which Megatron's unfused
    ``apply_rotary_pos_emb`` broadcasts over the heads (the CPU's local spec; TE's fused RoPE is not used there).
    A pipeline stage without the rotary module (none, or learned positions) needs nothing.
    """
    bare = unwrap_model(model)
    rotary = getattr(bare, "rotary_pos_emb", None)
    if rotary is None or getattr(bare, "position_embedding_type", "rope") != "rope":
        if rotary is not None:
            raise ValueError(f"per-token RoPE positions support position_embedding_type 'rope', not "
                             f"{bare.position_embedding_type!r}")
        yield
        return
    if getattr(bare.config, "apply_rope_fusion", False):
        raise ValueError("per-token RoPE positions need the unfused RoPE (apply_rope_fusion=false: the local spec)")
    inv_freq = rotary.inv_freq.to(position_ids.device)
    positions = position_ids.t().to(inv_freq.dtype)  # [S, B]
    if rotary.seq_len_interpolation_factor is not None:
        positions = positions * (1 / rotary.seq_len_interpolation_factor)  # as get_freqs_non_repeated
    freqs = positions[..., None] * inv_freq  # [S, B, D/2]
    if rotary.rotary_interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).reshape(*freqs.shape[:2], -1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    emb = emb[:, :, None, :]

    def at_positions(*args: Any, **kwargs: Any) -> torch.Tensor:
        return emb

    rotary.forward = at_positions  # the instance attribute shadows the class's (cached) forward
    try:
        yield
    finally:
        del rotary.forward


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare ``GPTModel`` inside DDP / Float16Module wrappers."""
    while not isinstance(model, GPTModel) and hasattr(model, "module"):
        model = model.module
    return model


def as_chunks(model_or_chunks: Any) -> list[torch.nn.Module]:
    """A list of bare model chunks (one per virtual pipeline stage) from a model or a list of them."""
    chunks = model_or_chunks if isinstance(model_or_chunks, (list, tuple)) else [model_or_chunks]
    return [unwrap_model(c) for c in chunks]


def _stage_flags(pre_process: bool | None, post_process: bool | None,
                 vp_stage: int | None) -> tuple[bool, bool]:
    pre_process = is_first_stage(vp_stage) if pre_process is None else pre_process
    post_process = is_last_stage(vp_stage) if post_process is None else post_process
    return pre_process, post_process


def prepare_moe(config: TransformerConfig, use_te: bool, grouped_experts: bool = True) -> None:
    """Make a MoE config buildable with this spec: grouped GEMM only with TE (and ``grouped_experts``: LoRA
    adapts experts one linear at a time, so it asks for one MLP per expert), and Megatron without TE
    (megatron-core 0.16 needs its router's TE GEMM name defined: ``compat.moe_router_gemm_without_te``)."""
    if not use_te or not grouped_experts:
        config.moe_grouped_gemm = False  # one MLP per expert (SequentialMLP; TE linears with TE)
    moe_router_gemm_without_te()


def mark_expert_params(model: torch.nn.Module, config: TransformerConfig) -> None:
    """Mark every routed-expert weight as expert-parallel (``allreduce=False``), whatever the layout.

    DDP then reduces their gradients over the expert data-parallel group, and Megatron's optimizer keeps
    them in an optimizer of their own (a ``ChainedOptimizer`` of dense + experts). Megatron marks them only
    when the experts are laid out unlike the attention -- 0.19: EP > 1 or ETP != TP; 0.16: EP > 1 only, so
    with EP 1 and ETP != TP DDP all-reduced each rank's expert shard with the other shards' over the
    attention DP group (wrong gradients). Marking them always also gives every layout the same optimizer
    structure, so a training checkpoint saved at EP 2 resumes at EP 1 and back. At EP 1 and ETP = TP the
    expert data-parallel group is the DP group: the same reduction.
    """
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False


def set_moe_aux_loss_coeff(model_or_chunks: Any, coeff: float) -> None:
    """The load-balancing loss coefficient of MoE chunks (routers read it from the shared config per step)."""
    for chunk in as_chunks(model_or_chunks):
        if getattr(chunk.config, "num_moe_experts", None):
            chunk.config.moe_aux_loss_coeff = float(coeff)


def build_gpt_model(arch: ModelArch, *, config: TransformerConfig | None = None,
                    pre_process: bool | None = None, post_process: bool | None = None,
                    vp_stage: int | None = None, use_te: bool | None = None,
                    params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                    share_embeddings_and_output_weights: bool | None = None,
                    grouped_experts: bool = True) -> GPTModel:
    """This rank's ``GPTModel`` (chunk ``vp_stage``) for an architecture; TP/PP/VPP from ``parallel_state``.

    ``config`` overrides the TransformerConfig derived from ``arch`` and the current parallel layout. (A
    ``transformers`` config, dict or path is parsed first, :meth:`ModelArch.from_hf`: what tests pass.)
    ``sequence_parallel`` needs TP > 1 and the Transformer Engine spec (the local spec's torch norms
    cannot split the sequence); it is refused otherwise rather than silently dropped. ``grouped_experts``
    False: one MLP per expert even with TE (what LoRA on experts needs).
    """
    arch = ModelArch.from_hf(arch)  # transitional: tests pass transformers configs
    tp = ps.get_tensor_model_parallel_world_size()
    if use_te is None:
        use_te = transformer_engine_on_cuda()
    if config is None:  # Megatron's fused kernels with the TE spec only (a local-spec model on CUDA: none)
        config = transformer_config_from_hf(
            arch, tp=tp, pp=ps.get_pipeline_model_parallel_world_size(),
            vpp=ps.get_virtual_pipeline_model_parallel_world_size(), params_dtype=params_dtype,
            sequence_parallel=sequence_parallel, ep=ps.get_expert_model_parallel_world_size(),
            etp=ps.get_expert_tensor_parallel_world_size(), fused=use_te)
    if config.num_moe_experts:
        prepare_moe(config, use_te, grouped_experts)
    if config.sequence_parallel and not use_te:
        raise ValueError("sequence parallelism needs the Transformer Engine layer spec (CUDA with "
                         "transformer_engine installed: pip install -e '.[gpu]'); set parallel.sequence_parallel=false")
    pre_process, post_process = _stage_flags(pre_process, post_process, vp_stage)
    rope = arch.rope
    tie = arch.tie_word_embeddings if share_embeddings_and_output_weights is None else \
        share_embeddings_and_output_weights
    # Newer GPTModel versions read these from the config when it has such fields (NeMo-style configs).
    for attr, value in (("position_embedding_type", "rope"), ("rotary_base", rope.theta)):
        if hasattr(config, attr):
            setattr(config, attr, value)
    kwargs: dict[str, Any] = {}
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, use_te),
        vocab_size=padded_vocab_size(arch.vocab_size, tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=tie,
        position_embedding_type="rope",
        rotary_base=rope.theta,
        # HF "linear" scaling divides positions by factor, as Megatron's interpolation factor does.
        seq_len_interpolation_factor=rope.factor if rope.rope_type == "linear" else None,
        **kwargs,
    )
    model.built_with_te = use_te  # packed micro-batches: THD with TE, an explicit mask with the local spec
    if config.num_moe_experts:
        mark_expert_params(model, config)
    if rope.rope_type == "llama3":
        # Megatron's built-in llama3 scaling (rope_scaling=True) fixes low/high_freq_factor and
        # original_max_position_embeddings; compute HF's formula with the checkpoint's values instead.
        rotary = model.rotary_pos_emb
        rotary.inv_freq = llama3_inv_freq(rotary.inv_freq, rope)
    return model


class _AllReduceGradOverTP(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over the TP group.

    Megatron's ``copy_to_tensor_model_parallel_region`` all-reduces ``grad.contiguous()``, which is a
    discarded copy when the gradient is non-contiguous -- as it is here, because ``GPTModel`` returns
    ``hidden.transpose(0, 1)``. This version reduces a contiguous tensor it returns.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        group = ps.get_tensor_model_parallel_group()
        if dist.get_world_size(group) == 1:
            return grad
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)
        return grad


def _hidden_state_forward(self: torch.nn.Module, input_: torch.Tensor, weight: torch.Tensor | None = None,
                          runtime_gather_output: bool | None = None, *, vocab_parallel_consumer: bool,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Output layer in hidden mode: hidden[S, B, H] -> (hidden[S, B, H], None), entering the TP region."""
    sequence_parallel = getattr(self, "sequence_parallel", False)
    if vocab_parallel_consumer:
        # What ColumnParallelLinear does to its input: the consumer multiplies by this rank's vocab
        # shard, so the hidden-state grads of all TP ranks are summed (all-reduce / reduce-scatter).
        if sequence_parallel:
            return gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True), None
        return _AllReduceGradOverTP.apply(input_), None
    if sequence_parallel:
        return gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False), None
    return input_, None


def enable_hidden_state_output(model_or_chunks: Any, enabled: bool = True,
                               vocab_parallel_consumer: bool = True) -> None:
    """Make the last stage return final hidden states ``[B, S, H]`` (after the final norm) instead of logits.

    The output layer module stays in place (same parameters, state-dict keys and tied-embedding sync);
    only its forward is swapped. With ``vocab_parallel_consumer`` (default) the hidden states enter the
    tensor-parallel region as the output layer's input would: with TP>1 their gradient is all-reduced
    over the TP group in backward (and gathered/reduce-scattered under sequence parallelism), so a
    consumer that multiplies by ``output_weight(model)`` [V/tp, H] must NOT reduce grad_hidden itself.
    Pass ``vocab_parallel_consumer=False`` for a consumer that is replicated over TP.
    """
    for chunk in as_chunks(model_or_chunks):
        layer = getattr(chunk, "output_layer", None)
        if layer is None:
            continue  # not a post-process chunk
        if enabled:
            def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
                return _hidden_state_forward(self, *args, vocab_parallel_consumer=vocab_parallel_consumer,
                                             **kwargs)

            layer.forward = types.MethodType(forward, layer)
        else:
            layer.__dict__.pop("forward", None)


def hidden_state_output_enabled(model: torch.nn.Module) -> bool:
    """Whether ``enable_hidden_state_output`` is active on this (post-process) chunk."""
    layer = getattr(unwrap_model(model), "output_layer", None)
    return layer is not None and "forward" in layer.__dict__


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """This rank's output (vocab) weight shard ``[V_pad/tp, H]``: the tied embedding or ``output_layer.weight``."""
    model = unwrap_model(model)
    if not model.post_process:
        raise ValueError("output_weight() is only defined on the last pipeline stage")
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight
