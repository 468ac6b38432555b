"""Hugging Face config -> the typed ``ModelArch`` (parsed and checked once) -> Megatron-Core ``TransformerConfig``,
for the Llama, Qwen2, Qwen3 and Qwen3-MoE families."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from rao_megatron.parallel.device import transformer_engine_on_cuda

# HF architecture name -> model family (the conversion table and the attention-bias layout follow it).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",  # Llama-2/3/3.1, SmolLM2, EuroLLM
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",  # Qwen2 / Qwen2.5: qkv bias
    "Qwen3ForCausalLM": "qwen3",  # Qwen3 dense: q/k RMSNorm, no qkv bias
    "Qwen3MoeForCausalLM": "qwen3_moe",  # Qwen3-MoE: q/k RMSNorm, routed experts, no shared expert
    "LlamaForSequenceClassification": "llama",  # reward models
    "MistralForSequenceClassification": "llama",
    "Qwen2ForSequenceClassification": "qwen2",
    "Qwen3ForSequenceClassification": "qwen3",
    "Qwen3MoeForSequenceClassification": "qwen3_moe",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe"}
#: families whose attention normalises q and k per head (Megatron's ``qk_layernorm``)
QK_NORM_FAMILIES = frozenset({"qwen3", "qwen3_moe"})
#: families with routed experts (Megatron's MoE layer)
MOE_FAMILIES = frozenset({"qwen3_moe"})


def hf_config_to_dict(hf_config: Any) -> dict[str, Any]:
    """A plain dict from a ``PretrainedConfig``, a dict, a config.json path or a checkpoint dir."""
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if isinstance(hf_config, (str, os.PathLike)):
        path = os.fspath(hf_config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return json.load(f)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"expected a transformers config, dict or path, got {type(hf_config).__name__}")


def model_family(cfg: dict[str, Any]) -> str:
    """'llama', 'qwen2', 'qwen3' or 'qwen3_moe' from ``architectures`` (or ``model_type``); ValueError otherwise."""
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    if not archs and cfg.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[cfg["model_type"]]
    name = ", ".join(archs) if archs else f"model_type={cfg.get('model_type')!r}"
    raise ValueError(f"unsupported architecture {name}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding settings: base, HF ``rope_type`` and its parameters."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def rope_spec(cfg: dict[str, Any]) -> RopeSpec:
    """Read rope settings from transformers 4.x (``rope_theta`` + ``rope_scaling``) or 5.x (``rope_parameters``)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ("default", "llama3", "linear"):
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, llama3, linear")
    if rope_type == "default":
        return RopeSpec(theta=float(theta))
    return RopeSpec(
        theta=float(theta), rope_type=rope_type, factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def llama3_inv_freq(inv_freq: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Llama-3 frequency scaling of ``inv_freq[D/2]``, as HF ``_compute_llama3_parameters`` does."""
    low_freq_wavelen = spec.original_max_position_embeddings / spec.low_freq_factor
    high_freq_wavelen = spec.original_max_position_embeddings / spec.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / spec.factor, inv_freq)
    smooth = (spec.original_max_position_embeddings / wavelen - spec.low_freq_factor) / (
        spec.high_freq_factor - spec.low_freq_factor)
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def padded_vocab_size(vocab_size: int, tp: int = 1, divisible_by: int = 128) -> int:
    """Vocab rounded up to a multiple of ``divisible_by * tp``, as Megatron pads it."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def _check_divisible(name: str, value: int, by_name: str, by: int) -> None:
    if by < 1 or value % by != 0:
        raise ValueError(f"{name}={value} is not divisible by {by_name}={by}")


def num_experts(cfg: dict[str, Any]) -> int:
    """Routed experts per MoE layer: ``num_experts`` (Qwen's config.json) or ``num_local_experts``
    (what transformers 5 writes for the same attribute)."""
    value = cfg.get("num_experts", cfg.get("num_local_experts"))
    if not value:
        raise ValueError("MoE config without num_experts")
    return int(value)


@dataclass(frozen=True)
class MoeSpec:
    """The routed-expert settings of a Qwen3-MoE config, in HF's terms."""

    num_experts: int
    top_k: int
    ffn_hidden_size: int
    norm_topk_prob: bool
    router_aux_loss_coef: float


def moe_spec(cfg: dict[str, Any]) -> MoeSpec | None:
    """The config's MoE settings (None for a dense family); ValueError for layouts not mapped.

    Every decoder layer must be a MoE layer (``decoder_sparse_step`` 1, no ``mlp_only_layers``): true of
    all released Qwen3-MoE models. Qwen3-MoE has no shared expert.
    """
    if model_family(cfg) not in MOE_FAMILIES:
        return None
    if int(cfg.get("decoder_sparse_step", 1) or 1) != 1 or cfg.get("mlp_only_layers"):
        raise ValueError("Qwen3-MoE configs with dense layers (decoder_sparse_step != 1 or mlp_only_layers) "
                         "are not supported: every layer must be a MoE layer")
    if cfg.get("shared_expert_intermediate_size"):
        raise ValueError("shared experts are not supported (Qwen3-MoE has none)")
    spec = MoeSpec(num_experts=num_experts(cfg), top_k=int(cfg["num_experts_per_tok"]),
                   ffn_hidden_size=int(cfg["moe_intermediate_size"]),
                   norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                   router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0) or 0.0))
    if not 1 <= spec.top_k <= spec.num_experts:
        raise ValueError(f"num_experts_per_tok={spec.top_k} must be between 1 and num_experts={spec.num_experts}")
    return spec


@dataclass(frozen=True)
class ModelDims:
    """The sizes the mappings need, plus this rank's place in the TP group."""

    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    tp_size: int = 1
    tp_rank: int = 0
    num_experts: int = 0  # routed experts per layer (0: dense)
    ep_size: int = 1  # expert parallel: each rank holds num_experts / ep_size experts
    ep_rank: int = 0
    etp_size: int = 1  # expert tensor parallel: each expert's weights are split this many ways
    etp_rank: int = 0

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size, self.tp_size)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def global_expert(self, local: int) -> int:
        """The HF (global) index of this EP rank's local expert ``local``."""
        return self.ep_rank * self.num_local_experts + local

    def for_experts(self) -> ModelDims:
        """The dims an expert weight is sharded by: the expert tensor-parallel group in place of TP."""
        return dataclasses.replace(self, tp_size=self.etp_size, tp_rank=self.etp_rank)

    def placed(self, tp_size: int = 1, tp_rank: int = 0, *, ep_size: int = 1, ep_rank: int = 0,
               etp_size: int | None = None, etp_rank: int = 0) -> ModelDims:
        """These sizes at a rank's place in the TP, EP and expert-TP groups (``etp_size`` None: the TP group's)."""
        return dataclasses.replace(self, tp_size=tp_size, tp_rank=tp_rank, ep_size=ep_size, ep_rank=ep_rank,
                                   etp_size=tp_size if etp_size is None else etp_size,
                                   etp_rank=tp_rank if etp_size is None else etp_rank)

    @classmethod
    def from_hf(cls, arch: ModelArch, tp_size: int = 1, tp_rank: int = 0, *, ep_size: int = 1, ep_rank: int = 0,
                etp_size: int | None = None, etp_rank: int = 0) -> ModelDims:
        """``arch.dims`` placed at a rank (a config, dict or path is parsed first: :meth:`ModelArch.from_hf`)."""
        return ModelArch.from_hf(arch).dims.placed(tp_size, tp_rank, ep_size=ep_size, ep_rank=ep_rank,
                                                   etp_size=etp_size, etp_rank=etp_rank)


@dataclass(frozen=True)
class ModelArch:
    """One model architecture, parsed and checked once from its HF config (:meth:`from_hf`).

    What the model builders, the mapping tables and the converters read; layout-independent (``dims`` is
    placed on a single rank; ``hf_state.rank_dims`` places it on this one). :attr:`hf_dict` is the HF config
    as a plain dict, as checkpoint metadata (``rao_model.json``) and HF export record it; ``hf_object`` the
    ``transformers`` config it was parsed from, if any (an HF model of the same architecture:
    :meth:`to_transformers`). Neither takes part in equality.
    """

    family: str
    dims: ModelDims
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    rope: RopeSpec
    moe: MoeSpec | None
    tie_word_embeddings: bool
    rms_norm_eps: float
    initializer_range: float
    max_position_embeddings: int
    _hf_dict: dict[str, Any] = field(compare=False, repr=False)
    hf_object: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_hf(cls, source: Any) -> ModelArch:
        """Parse a ``transformers`` config, a config dict, a config.json path or a model directory (a
        ``ModelArch`` is returned as is). ValueError for an architecture or setting that is not mapped."""
        if isinstance(source, ModelArch):
            return source
        cfg = hf_config_to_dict(source)
        family = model_family(cfg)
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported (SwiGLU with silu only)")
        if family != "qwen2" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
            raise ValueError(f"{family} configs with attention_bias/mlp_bias are not supported")
        if family in QK_NORM_FAMILIES and cfg.get("use_sliding_window"):
            raise ValueError(f"{family} configs with use_sliding_window=true are not supported (full causal attention)")
        # Mistral v0.1's sliding_window (4096) is not mapped: attention is fully causal, which is the same
        # as long as sequences are no longer than the window.
        rope = rope_spec(cfg)
        moe = moe_spec(cfg)
        heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
        dims = ModelDims(num_heads=heads, num_query_groups=cfg.get("num_key_value_heads") or heads,
                         head_dim=cfg.get("head_dim") or hidden // heads, vocab_size=cfg["vocab_size"],
                         num_experts=0 if moe is None else moe.num_experts)
        return cls(family=family, dims=dims, num_layers=cfg["num_hidden_layers"], hidden_size=hidden,
                   ffn_hidden_size=cfg["intermediate_size"], rope=rope, moe=moe,
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                   initializer_range=float(cfg.get("initializer_range", 0.02)),
                   max_position_embeddings=cfg.get("max_position_embeddings", 4096), _hf_dict=cfg,
                   hf_object=None if isinstance(source, (dict, str, os.PathLike)) else source)

    @property
    def hf_dict(self) -> dict[str, Any]:
        """The HF config as a plain dict: the dict read, or the ``transformers`` config's ``to_dict()`` now (what
        checkpoints recorded before the architecture was parsed once: HF's ``from_config`` sets the config's
        ``dtype`` when the random init builds an HF model from it)."""
        return self.hf_object.to_dict() if self.hf_object is not None else dict(self._hf_dict)

    @property
    def vocab_size(self) -> int:
        return self.dims.vocab_size

    @property
    def qk_layernorm(self) -> bool:
        """q and k normalised per head (Megatron's ``qk_layernorm``: Qwen3, Qwen3-MoE)."""
        return self.family in QK_NORM_FAMILIES

    @property
    def qkv_bias(self) -> bool:
        """q/k/v projections with a bias (Qwen2)."""
        return self.family == "qwen2"

    def to_transformers(self) -> Any:
        """The ``transformers`` config of this architecture: the one it was parsed from, else one built from
        ``hf_dict``."""
        if self.hf_object is not None:
            return self.hf_object
        from transformers import AutoConfig  # heavy: transformers; ModelArch itself uses none

        return AutoConfig.for_model(**self._hf_dict)


def check_expert_layout(arch: ModelArch, *, tp: int = 1, ep: int = 1, etp: int | None = None) -> None:
    """Expert parallel sizes against the model: EP divides the experts, ETP the expert FFN width.

    A dense model takes only ep = 1 and etp unset or equal to tp. Messages name the config keys.
    """
    etp = tp if etp is None else etp
    if ep < 1 or etp < 1:
        raise ValueError(f"parallel.ep={ep} and parallel.etp={etp} must be >= 1")
    arch = ModelArch.from_hf(arch)  # transitional: tests pass config dicts
    spec = arch.moe
    if spec is None:
        if ep != 1 or etp != tp:
            raise ValueError(f"parallel.ep={ep} / parallel.etp={etp} need a mixture-of-experts model; "
                             f"{arch.family} is dense (use ep=1 and leave etp unset)")
        return
    if spec.num_experts % ep:
        raise ValueError(f"parallel.ep={ep} must divide num_experts={spec.num_experts}; valid: "
                         f"{', '.join(str(d) for d in range(1, spec.num_experts + 1) if spec.num_experts % d == 0)}")
    if spec.ffn_hidden_size % etp:
        raise ValueError(f"parallel.etp={etp} must divide moe_intermediate_size={spec.ffn_hidden_size}")


def _apex_wgrad_fusion_installed() -> bool:
    """apex's ``fused_weight_gradient_mlp_cuda`` imports (what Megatron's ``tensor_parallel.layers`` tries)."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def fusion_settings(te_on_cuda: bool, apex_wgrad_fusion: bool = False) -> dict[str, bool]:
    """Megatron's kernel-fusion flags for the Transformer Engine spec on CUDA (``te_on_cuda``); all off otherwise.

    On CUDA with TE (the megatron-core 0.16.1 sources that read each flag are named):

    - ``apply_rope_fusion``: TE's fused RoPE (``rope_utils.apply_rotary_pos_emb``; ``TransformerConfig``
      checks TE provides it). Packed THD batches need it: the unfused THD path splits by ``cu_seqlens``
      on the host, a device sync per layer.
    - ``gradient_accumulation_fusion``: TE's linears write weight gradients straight into DDP's fp32
      ``main_grad`` (``fuse_wgrad_accumulation``); without it each micro-batch's gradient is rounded to the
      bf16 parameter dtype first. Only with apex's ``fused_weight_gradient_mlp_cuda``
      (``apex_wgrad_fusion``): the output layer is Megatron's own ``ColumnParallelLinear`` whatever the
      spec, and it refuses the flag without that extension (``tensor_parallel/layers.py``). Needs the
      trained model to be DDP-wrapped (the trainer's always is; frozen and forward-only models never
      compute weight gradients).
    - ``bias_activation_fusion``: SwiGLU without bias through Megatron's fused ``bias_swiglu_impl``
      (``transformer/mlp.py``, ``moe/experts.py``); ``TransformerConfig`` allows it for silu.
    - ``bias_dropout_fusion``: the fused residual add (``fusions/fused_bias_dropout.py``).

    Off everywhere: ``masked_softmax_fusion`` (read by the local ``DotProductAttention`` only; TE's attention
    ignores it, and the local path would need Megatron's compiled softmax kernels) and
    ``persist_layer_norm`` (apex ``FusedLayerNorm`` only; TE norms ignore it and the local spec's torch
    norms assert it is off). On the CPU every flag is off: the fused kernels need CUDA.
    """
    return dict(
        apply_rope_fusion=te_on_cuda,
        gradient_accumulation_fusion=te_on_cuda and apex_wgrad_fusion,
        bias_activation_fusion=te_on_cuda,
        bias_dropout_fusion=te_on_cuda,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )


def transformer_config_from_hf(arch: ModelArch, *, tp: int = 1, pp: int = 1, vpp: int | None = None,
                               ep: int = 1, etp: int | None = None,
                               params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                               fused: bool | None = None, **overrides: Any) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for a Llama/Mistral/Qwen2/Qwen3/Qwen3-MoE architecture at the given layout.

    ``ep`` / ``etp``: expert parallel and expert tensor parallel sizes (MoE only; ``etp`` None = ``tp``).
    ``fused``: Megatron's fused kernels (:func:`fusion_settings`); None = on when the model runs on CUDA
    with Transformer Engine (``parallel.device.transformer_engine_on_cuda``; ``models.provider`` passes whether
    it builds the TE spec).
    ``overrides`` are passed to ``TransformerConfig`` last (e.g. ``recompute_granularity``).
    """
    arch = ModelArch.from_hf(arch)  # transitional (tests pass transformers configs); checks live there
    heads, groups, layers = arch.dims.num_heads, arch.dims.num_query_groups, arch.num_layers
    _check_divisible("num_attention_heads", heads, "tp", tp)
    _check_divisible("num_key_value_heads (query groups)", groups, "tp", tp)
    _check_divisible("num_attention_heads", heads, "num_key_value_heads", groups)
    _check_divisible("num_hidden_layers", layers, "pp", pp)
    vpp = vpp if vpp and vpp > 1 else None
    if vpp is not None:
        if pp < 2:
            raise ValueError(f"virtual pipeline size vpp={vpp} needs pp > 1, got pp={pp}")
        _check_divisible("num_hidden_layers", layers, "pp*vpp", pp * vpp)
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel needs tp > 1 (it splits the sequence over the TP group)")
    check_expert_layout(arch, tp=tp, ep=ep, etp=etp)
    on_gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=arch.dims.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=not on_gpu,
        qk_layernorm=arch.qk_layernorm,
    )
    fused = transformer_engine_on_cuda() if fused is None else fused
    kwargs.update(fusion_settings(fused, fused and _apex_wgrad_fusion_installed()))
    if arch.moe is not None:
        kwargs.update(_moe_kwargs(arch.moe, ep=ep, etp=tp if etp is None else etp, on_gpu=on_gpu))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _moe_kwargs(moe: MoeSpec, *, ep: int, etp: int, on_gpu: bool) -> dict[str, Any]:
    """Megatron's MoE settings for HF's Qwen3-MoE router and experts.

    HF routes with ``softmax(logits)`` (fp32), keeps the top k and, with ``norm_topk_prob``, renormalises
    them to sum to 1. Megatron's default (``moe_router_pre_softmax=False``) takes the top k logits and
    softmaxes over those: the same numbers. Without ``norm_topk_prob`` HF keeps the unnormalised top-k
    probabilities: Megatron's ``moe_router_pre_softmax=True``. The router logits are computed in fp32
    (HF: in the model dtype; the same in fp32, more precise in bf16). The load-balancing loss is
    Megatron's per-layer switch loss with ``router_aux_loss_coef`` as its coefficient; the trainer
    overrides it with ``model.moe_aux_loss_coeff`` (see docs/conversion.md).
    """
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.top_k,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not moe.norm_topk_prob,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=moe.router_aux_loss_coef,
        # no token dropping: every token reaches its k experts, as in HF
        moe_expert_capacity_factor=None,
        # Megatron's all-to-all dispatcher needs CUDA streams; the all-gather one runs over gloo
        moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
        # TE's grouped GEMM on GPU (the layer spec follows it), one MLP per expert on CPU
        moe_grouped_gemm=on_gpu,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def tiny_hf_config(family: str = "llama", **overrides: Any) -> Any:
    """A tiny random-init ``transformers`` config for tests: 2 layers, hidden 64, 4 heads / 2 KV groups.

    llama: untied, plain rope (pass ``tie_word_embeddings=True`` or ``rope_scaling=LLAMA3_TINY_ROPE``);
    qwen2: untied, qkv bias; qwen3: tied (as the small Qwen3 sizes are), q/k norm, head_dim 32 so that
    heads x head_dim (128) differs from hidden_size (64), as in Qwen3-0.6B; qwen3_moe: the same attention, untied,
    4 experts of width 32, top-2 with renormalised top-k weights (``norm_topk_prob``, as Qwen3-30B-A3B).
    """
    from transformers import LlamaConfig, Qwen2Config  # heavy: transformers; ModelArch itself uses none

    common: dict[str, Any] = dict(
        vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if family == "llama":
        common.update(rope_theta=10000.0, architectures=["LlamaForCausalLM"])
        common.update(overrides)
        return LlamaConfig(**common)
    if family == "qwen2":
        common.update(rope_theta=1000000.0, architectures=["Qwen2ForCausalLM"])
        common.update(overrides)
        return Qwen2Config(**common)
    if family in ("qwen3", "qwen3_moe"):
        try:
            from transformers import Qwen3Config, Qwen3MoeConfig
        except ImportError as e:  # Qwen3 arrived in transformers 4.51
            raise ValueError(f"the {family} family needs transformers >= 4.51 (Qwen3Config): {e}") from None
        common.update(rope_theta=1000000.0, head_dim=32, attention_bias=False)
        if family == "qwen3":
            common.update(tie_word_embeddings=True, architectures=["Qwen3ForCausalLM"])
            common.update(overrides)
            return Qwen3Config(**common)
        common.update(architectures=["Qwen3MoeForCausalLM"], num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, norm_topk_prob=True, router_aux_loss_coef=0.001,
                      decoder_sparse_step=1, mlp_only_layers=[])
        common.update(overrides)
        return Qwen3MoeConfig(**common)
    raise ValueError(f"unknown tiny family {family!r}; use 'llama', 'qwen2', 'qwen3' or 'qwen3_moe'")


# Llama-3.1-style scaling squeezed to tiny context lengths, so that every frequency band
# (kept, interpolated, divided by factor) occurs with head_dim 16.
LLAMA3_TINY_ROPE: dict[str, Any] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
