"""Checks run before any conversion starts: architecture, TP/PP layout, and every HF tensor's name and shape.

They read only config.json and the safetensors headers, so a bad input fails in a second with a
message naming the tensor or setting, before any process is started or any file is written.
"""

from __future__ import annotations

from typing import Any

from rao_megatron.conversion.hf_io import ConversionError
from rao_megatron.models.hf_config import (
    ModelArch,
    check_expert_layout,
    model_family,
    transformer_config_from_hf,
)
from rao_megatron.models.hf_mappings import mappings_for

TASKS = ("policy", "rm")
_SEQ_CLS, _CAUSAL = "ForSequenceClassification", "ForCausalLM"


def task_of(cfg: dict[str, Any]) -> str:
    """'rm' for a ``*ForSequenceClassification`` config, else 'policy'."""
    return "rm" if any(a.endswith(_SEQ_CLS) for a in cfg.get("architectures") or []) else "policy"


def config_for_task(cfg: dict[str, Any], task: str) -> dict[str, Any]:
    """The HF config of the model to write: a one-label ``*ForSequenceClassification`` for 'rm'."""
    if task not in TASKS:
        raise ConversionError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    model_family(cfg)  # unsupported architecture -> ValueError naming it
    cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")}
    archs = list(cfg.get("architectures") or [])
    if task == "policy" and task_of(cfg) == "rm":
        raise ConversionError(f"{archs[0]} is a reward model; convert it with --task rm")
    if task == "rm":
        base = archs[0] if archs else f"{cfg['model_type'].capitalize()}{_CAUSAL}"
        cfg["architectures"] = [base.replace(_CAUSAL, _SEQ_CLS)]
        # the scalar head: one label
        cfg["id2label"], cfg["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
        cfg.pop("num_labels", None)
    return cfg


def _valid_divisors(*values: int) -> list[int]:
    return [d for d in range(1, min(values) + 1) if all(v % d == 0 for v in values)]


def check_layout(cfg: dict[str, Any], tp: int, pp: int, ep: int = 1, etp: int | None = None) -> ModelArch:
    """TP must divide the heads and the KV groups, PP the layers, EP the experts, ETP the expert width;
    then the full TransformerConfig checks. Returns the architecture, parsed once here."""
    heads = cfg["num_attention_heads"]
    groups = cfg.get("num_key_value_heads") or heads
    layers = cfg["num_hidden_layers"]
    if tp < 1 or heads % tp or groups % tp:
        raise ConversionError(
            f"--tp {tp}: num_attention_heads={heads} and num_key_value_heads={groups} (query groups) must both "
            f"be divisible by the tensor-parallel size; valid --tp values: "
            f"{', '.join(map(str, _valid_divisors(heads, groups)))}")
    if pp < 1 or layers % pp:
        raise ConversionError(f"--pp {pp}: num_hidden_layers={layers} is not divisible by the pipeline-parallel "
                              f"size; valid --pp values: {', '.join(map(str, _valid_divisors(layers)))}")
    try:
        arch = ModelArch.from_hf(cfg)  # activation, rope type, bias layout, experts
        check_expert_layout(arch, tp=tp, ep=ep, etp=etp)
    except ValueError as e:
        raise ConversionError(str(e).replace("parallel.ep", "--ep").replace("parallel.etp", "--etp")) from None
    transformer_config_from_hf(arch, tp=tp, pp=pp, ep=ep, etp=etp)
    return arch


def conversion_world_size(tp: int, pp: int, ep: int = 1, etp: int | None = None) -> int:
    """Ranks a conversion at this layout needs: tp x pp x dp with the smallest dp for which the experts'
    etp x ep tiles the tp x dp ranks of a stage (Megatron takes EP from the data-parallel ranks)."""
    etp = tp if etp is None else etp
    dp = 1
    while (tp * dp) % (etp * ep):
        dp += 1
    return tp * pp * dp


def expected_hf_shapes(arch: ModelArch, task: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an HF checkpoint of this architecture and task holds."""
    arch = ModelArch.from_hf(arch)  # transitional: tests pass config dicts
    h, inter, vocab, dims = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size, arch.dims
    head_dim = dims.head_dim
    q, kv = dims.num_heads * head_dim, dims.num_query_groups * head_dim
    layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
             "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
             "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q)}
    moe = arch.moe
    if moe is None:
        layer.update({"mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
                      "mlp.down_proj.weight": (h, inter)})
    else:
        layer["mlp.gate.weight"] = (moe.num_experts, h)
        f = moe.ffn_hidden_size
        for e in range(moe.num_experts):
            layer.update({f"mlp.experts.{e}.gate_proj.weight": (f, h), f"mlp.experts.{e}.up_proj.weight": (f, h),
                          f"mlp.experts.{e}.down_proj.weight": (h, f)})
    if arch.qkv_bias:
        layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if arch.qk_layernorm:
        layer.update({"self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,)})
    shapes = {f"model.layers.{i}.{k}": v for i in range(arch.num_layers) for k, v in layer.items()}
    shapes.update({"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)})
    if task == "rm":
        shapes["score.weight"] = (1, h)
    elif not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def mapped_hf_names(arch: ModelArch, task: str) -> set[str]:
    """The HF names the mapping table reads (required ones): must equal ``expected_hf_shapes``' keys."""
    arch = ModelArch.from_hf(arch)  # transitional: tests pass config dicts
    names: set[str] = set()
    moe = arch.moe
    for m in mappings_for(arch, reward_head=task == "rm"):
        if m.optional:
            continue
        experts = range(moe.num_experts) if m.is_expert and moe is not None else [None]
        for i in (range(arch.num_layers) if "{layer}" in m.megatron else [None]):
            for e in experts:
                names.update(m.hf_names(i, e))
    return names


def _ignorable(name: str, arch: ModelArch, task: str) -> bool:
    # A tied or reward model has no lm_head parameter (HF ignores a stored copy too); old checkpoints
    # carry the rotary inv_freq buffer, which is recomputed from the config.
    return name.endswith("rotary_emb.inv_freq") or (
        name == "lm_head.weight" and (task == "rm" or arch.tie_word_embeddings))


def check_hf_tensors(shapes: dict[str, tuple[int, ...]], arch: ModelArch, task: str,
                     where: str = "HF checkpoint") -> list[str]:
    """Raise on a missing, extra or mis-shaped tensor; returns the optional tensors absent (a new RM head)."""
    arch = ModelArch.from_hf(arch)  # transitional: tests pass config dicts
    expected = expected_hf_shapes(arch, task)
    optional = {"score.weight"} if task == "rm" else set()
    name = (arch.hf_dict.get("architectures") or [arch.hf_dict.get("model_type")])[0]
    missing = sorted(set(expected) - set(shapes) - optional, key=_natural)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{where} lacks tensor {missing[0]!r}{more}, needed by {name}")
    extra = sorted((n for n in set(shapes) - set(expected) if not _ignorable(n, arch, task)), key=_natural)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ConversionError(f"{where} has unexpected tensor {extra[0]!r}{more}, not part of {name}")
    for tensor, shape in sorted(shapes.items(), key=lambda kv: _natural(kv[0])):
        if tensor in expected and tuple(shape) != expected[tensor]:
            width = (f"moe_intermediate_size={arch.moe.ffn_hidden_size}" if arch.moe is not None
                     else f"intermediate_size={arch.ffn_hidden_size}")
            raise ConversionError(f"tensor {tensor!r} has shape {tuple(shape)} but the config needs "
                                  f"{expected[tensor]} (hidden_size={arch.hidden_size}, "
                                  f"vocab_size={arch.vocab_size}, {width})")
    return sorted(optional - set(shapes))


def _natural(name: str) -> list[Any]:
    """Sort key putting layer 2 before layer 10."""
    return [int(p) if p.isdigit() else p for p in name.split(".")]
