"""HF <-> Megatron parameter mappings: one small object per parameter kind, one table per model family.

A mapping turns the HF tensor(s) of one parameter into this TP rank's Megatron shard (``to_megatron``)
and the shards of all TP ranks back into the HF tensor(s) (``to_hf``). It does no I/O and knows nothing
about pipeline stages: ``{layer}`` in a name is the layer index, global on the HF side; the caller maps
it to the chunk-local index on the Megatron side. ``{expert}`` (MoE) is the expert index, global on the
HF side and local to this expert-parallel rank on the Megatron side; expert weights are split over the
expert tensor-parallel group (``ModelDims.for_experts``) instead of the TP group.

HF names are those of the checkpoint files (``mlp.experts.{e}.gate_proj.weight`` per expert), which is
also what transformers 4.x holds in memory; transformers 5 fuses the experts in memory
(``mlp.experts.gate_up_proj [E, 2I, H]``), which :func:`hf_checkpoint_layout` presents per expert.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from rao_megatron.models.hf_config import ModelArch, ModelDims


@dataclass(frozen=True)
class ParamMapping:
    """One Megatron parameter <-> one or more HF tensors. Base class: replicated over TP."""

    megatron: str
    hf: tuple[str, ...]
    optional: bool = False  # missing in the HF checkpoint -> keep the Megatron init (e.g. a new RM head)
    tp_sharded = False

    @property
    def is_expert(self) -> bool:
        """One routed expert's weight: sharded over the expert TP group, ``{expert}`` local on the Megatron side."""
        return "{expert}" in self.megatron

    def hf_names(self, layer: int | None, expert: int | None = None) -> list[str]:
        return [n.format(layer=layer, expert=expert) for n in self.hf]

    def megatron_pattern(self) -> re.Pattern[str]:
        pattern = re.escape(self.megatron).replace(r"\{layer\}", r"(?P<layer>\d+)")
        return re.compile(pattern.replace(r"\{expert\}", r"(?P<expert>\d+)") + "$")

    def to_megatron(self, hf: list[torch.Tensor], dims: ModelDims) -> torch.Tensor:
        """HF tensor(s) -> this TP rank's Megatron tensor."""
        return hf[0]

    def to_hf(self, shards: list[torch.Tensor], dims: ModelDims) -> list[torch.Tensor]:
        """Megatron tensors of all TP ranks (rank order) -> HF tensor(s), in ``hf`` order."""
        return [shards[0]]


def replicated(megatron: str, hf: str, optional: bool = False) -> ParamMapping:
    """Same tensor on every TP rank (norm weights, a scalar reward head)."""
    return ParamMapping(megatron, (hf,), optional)


@dataclass(frozen=True)
class ColumnParallel(ParamMapping):
    """Split along the output dim (dim 0) over TP ranks."""

    tp_sharded = True

    def to_megatron(self, hf: list[torch.Tensor], dims: ModelDims) -> torch.Tensor:
        return hf[0].chunk(dims.tp_size, 0)[dims.tp_rank]

    def to_hf(self, shards: list[torch.Tensor], dims: ModelDims) -> list[torch.Tensor]:
        return [torch.cat(shards, 0)]


@dataclass(frozen=True)
class RowParallel(ParamMapping):
    """Split along the input dim (dim 1) over TP ranks."""

    tp_sharded = True

    def to_megatron(self, hf: list[torch.Tensor], dims: ModelDims) -> torch.Tensor:
        return hf[0].chunk(dims.tp_size, 1)[dims.tp_rank]

    def to_hf(self, shards: list[torch.Tensor], dims: ModelDims) -> list[torch.Tensor]:
        return [torch.cat(shards, 1)]


@dataclass(frozen=True)
class VocabParallel(ParamMapping):
    """Embedding / output rows: zero-padded from V to the padded vocab, then split over TP ranks."""

    tp_sharded = True

    def to_megatron(self, hf: list[torch.Tensor], dims: ModelDims) -> torch.Tensor:
        weight = hf[0]
        pad = dims.padded_vocab_size - weight.shape[0]
        if pad < 0:
            raise ValueError(f"HF vocab {weight.shape[0]} exceeds the config's vocab_size={dims.vocab_size}")
        if pad:
            weight = torch.cat([weight, weight.new_zeros(pad, *weight.shape[1:])], 0)
        return weight.chunk(dims.tp_size, 0)[dims.tp_rank]

    def to_hf(self, shards: list[torch.Tensor], dims: ModelDims) -> list[torch.Tensor]:
        return [torch.cat(shards, 0)[: dims.vocab_size]]


@dataclass(frozen=True)
class QKV(ParamMapping):
    """HF q/k/v (weight or bias) <-> Megatron ``linear_qkv``: per query group ``[q heads..., k, v]``.

    Megatron interleaves by query group so that TP splits whole groups: rows are
    ``[g0: q(nq/ng heads), k, v | g1: ... ]``; rank r holds groups ``[r*ng/tp, (r+1)*ng/tp)``.
    """

    tp_sharded = True

    def _split_sizes(self, dims: ModelDims) -> list[int]:
        q_per_group = dims.num_heads // dims.num_query_groups
        return [q_per_group * dims.head_dim, dims.head_dim, dims.head_dim]

    def to_megatron(self, hf: list[torch.Tensor], dims: ModelDims) -> torch.Tensor:
        q, k, v = hf
        rest = q.shape[1:]  # (H,) for weights, () for biases
        ng = dims.num_query_groups
        qkv = torch.cat([q.reshape(ng, -1, *rest), k.reshape(ng, -1, *rest), v.reshape(ng, -1, *rest)], 1)
        return qkv.chunk(dims.tp_size, 0)[dims.tp_rank].reshape(-1, *rest)

    def to_hf(self, shards: list[torch.Tensor], dims: ModelDims) -> list[torch.Tensor]:
        qkv = torch.cat(shards, 0)
        rest = qkv.shape[1:]
        grouped = qkv.reshape(dims.num_query_groups, -1, *rest)
        return [t.reshape(-1, *rest) for t in grouped.split(self._split_sizes(dims), 1)]


@dataclass(frozen=True)
class GatedMLP(ParamMapping):
    """HF gate_proj/up_proj <-> Megatron ``linear_fc1``: each TP shard is ``[gate_shard; up_shard]``."""

    tp_sharded = True

    def to_megatron(self, hf: list[torch.Tensor], dims: ModelDims) -> torch.Tensor:
        gate, up = (t.chunk(dims.tp_size, 0)[dims.tp_rank] for t in hf)
        return torch.cat([gate, up], 0)

    def to_hf(self, shards: list[torch.Tensor], dims: ModelDims) -> list[torch.Tensor]:
        halves = [s.chunk(2, 0) for s in shards]
        return [torch.cat([h[0] for h in halves], 0), torch.cat([h[1] for h in halves], 0)]


_L, _H = "decoder.layers.{layer}.", "model.layers.{layer}."


def llama_mappings(tied: bool, reward_head: bool = False) -> list[ParamMapping]:
    """Llama / Mistral / SmolLM2 / EuroLLM table (local and TE layer specs)."""
    table = [
        VocabParallel("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        replicated(_L + "input_layernorm.weight", _H + "input_layernorm.weight"),
        # TE spec fuses the pre-attention / pre-MLP norms into the following linear layer.
        replicated(_L + "self_attention.linear_qkv.layer_norm_weight", _H + "input_layernorm.weight"),
        QKV(_L + "self_attention.linear_qkv.weight",
            tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv")),
        RowParallel(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",)),
        replicated(_L + "pre_mlp_layernorm.weight", _H + "post_attention_layernorm.weight"),
        replicated(_L + "mlp.linear_fc1.layer_norm_weight", _H + "post_attention_layernorm.weight"),
        GatedMLP(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight")),
        RowParallel(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",)),
        replicated("decoder.final_layernorm.weight", "model.norm.weight"),
    ]
    if reward_head:
        # HF *ForSequenceClassification head; absent when starting an RM from a causal LM.
        table += [replicated("output_layer.weight", "score.weight", optional=True),
                  replicated("output_layer.bias", "score.bias", optional=True)]
    else:
        # Tied: the last stage's copy of the embedding (PP>1) is filled from the embedding itself.
        table.append(VocabParallel("output_layer.weight",
                                   ("model.embed_tokens.weight" if tied else "lm_head.weight",)))
    return table


def qwen2_mappings(tied: bool, reward_head: bool = False) -> list[ParamMapping]:
    """Qwen2 / Qwen2.5: the Llama table plus q/k/v biases."""
    return llama_mappings(tied, reward_head) + [
        QKV(_L + "self_attention.linear_qkv.bias", tuple(_H + f"self_attn.{p}_proj.bias" for p in "qkv")),
    ]


def _qk_norm_mappings() -> list[ParamMapping]:
    """Per-head RMSNorm of q and k (``[head_dim]``, shared by all heads): Megatron's ``qk_layernorm``."""
    return [replicated(_L + f"self_attention.{p}_layernorm.weight", _H + f"self_attn.{p}_norm.weight") for p in "qk"]


def qwen3_mappings(tied: bool, reward_head: bool = False) -> list[ParamMapping]:
    """Qwen3 dense: the Llama table plus the q/k norms (no qkv bias)."""
    return llama_mappings(tied, reward_head) + _qk_norm_mappings()


_E, _HE = _L + "mlp.experts.", _H + "mlp.experts.{expert}."


def qwen3_moe_mappings(tied: bool, reward_head: bool = False) -> list[ParamMapping]:
    """Qwen3-MoE: the Qwen3 attention; every MLP is a router plus routed experts (no shared expert).

    Per expert: fc1 = gate ⊕ up (each ETP shard ``[gate_shard; up_shard]``), fc2 = down. Local spec
    (CPU): ``SequentialMLP``, one module per local expert; TE spec (GPU, grouped GEMM): ``TEGroupedMLP``,
    whose fc1/fc2 hold one ``weight{i}`` per local expert. Both write the same dist checkpoint keys.
    """
    dense_mlp = (_L + "mlp.linear_fc1.", _L + "mlp.linear_fc2.")
    table = [m for m in llama_mappings(tied, reward_head) if not m.megatron.startswith(dense_mlp)]
    gate_up = (_HE + "gate_proj.weight", _HE + "up_proj.weight")
    return table + _qk_norm_mappings() + [
        replicated(_L + "mlp.router.weight", _H + "mlp.gate.weight"),
        GatedMLP(_E + "local_experts.{expert}.linear_fc1.weight", gate_up),
        RowParallel(_E + "local_experts.{expert}.linear_fc2.weight", (_HE + "down_proj.weight",)),
        GatedMLP(_E + "linear_fc1.weight{expert}", gate_up),
        RowParallel(_E + "linear_fc2.weight{expert}", (_HE + "down_proj.weight",)),
    ]


FAMILY_MAPPINGS = {"llama": llama_mappings, "qwen2": qwen2_mappings, "qwen3": qwen3_mappings,
                   "qwen3_moe": qwen3_moe_mappings}


def mappings_for(arch: ModelArch, reward_head: bool = False) -> list[ParamMapping]:
    """The mapping table for an architecture's family."""
    arch = ModelArch.from_hf(arch)  # transitional: tests pass transformers configs and dicts
    return FAMILY_MAPPINGS[arch.family](arch.tie_word_embeddings and not reward_head, reward_head)


# transformers 5 keeps a MoE layer's experts fused in memory; checkpoint files hold them per expert
_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


class _PerExpertView(Mapping[str, torch.Tensor]):
    """A state dict with fused expert tensors shown under the checkpoint's per-expert names (views, no copies)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self._sd = state_dict
        self._names: dict[str, tuple[str, int, slice | None]] = {}
        for key, tensor in state_dict.items():
            m = _FUSED_EXPERTS.match(key)
            if m is None:
                self._names[key] = (key, -1, None)
                continue
            prefix = m.group("prefix")
            for e in range(tensor.shape[0]):
                if m.group("kind") == "down_proj":  # [E, H, I]
                    self._names[f"{prefix}.{e}.down_proj.weight"] = (key, e, None)
                else:  # gate_up_proj [E, 2I, H]: gate rows first, then up (transformers' Concatenate(dim=1))
                    half = tensor.shape[1] // 2
                    self._names[f"{prefix}.{e}.gate_proj.weight"] = (key, e, slice(0, half))
                    self._names[f"{prefix}.{e}.up_proj.weight"] = (key, e, slice(half, None))

    def __getitem__(self, name: str) -> torch.Tensor:
        key, expert, rows = self._names[name]
        tensor = self._sd[key]
        if expert < 0:
            return tensor
        return tensor[expert] if rows is None else tensor[expert, rows]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def hf_checkpoint_layout(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``state_dict`` under checkpoint-file names: fused in-memory experts (transformers 5) split per expert.

    Returns ``state_dict`` itself when nothing is fused (dense models, safetensors files, transformers 4).
    """
    if not any(_FUSED_EXPERTS.match(k) for k in state_dict):
        return state_dict
    return _PerExpertView(state_dict)
