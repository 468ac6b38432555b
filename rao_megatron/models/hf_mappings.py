"""HF <-> Megatron parameter mappings: one small object per parameter kind, one table per model family.

A mapping turns the HF tensor(s) of one parameter into this TP rank's Megatron shard (``to_megatron``)
and the shards of all TP ranks back into the HF tensor(s) (``to_hf``). It does no I/O and knows nothing
about pipeline stages: ``{layer}`` in a name is the layer index, global on the HF side; the caller maps
it to the chunk-local index on the Megatron side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from rao_megatron.models.hf_config import hf_config_to_dict, model_family, padded_vocab_size


@dataclass(frozen=True)
class ModelDims:
    """The sizes the mappings need, plus this rank's place in the TP group."""

    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    tp_size: int = 1
    tp_rank: int = 0

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size, self.tp_size)

    @classmethod
    def from_hf(cls, hf_config: Any, tp_size: int = 1, tp_rank: int = 0) -> ModelDims:
        cfg = hf_config_to_dict(hf_config)
        heads = cfg["num_attention_heads"]
        return cls(num_heads=heads, num_query_groups=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   vocab_size=cfg["vocab_size"], tp_size=tp_size, tp_rank=tp_rank)


@dataclass(frozen=True)
class ParamMapping:
    """One Megatron parameter <-> one or more HF tensors. Base class: replicated over TP."""

    megatron: str
    hf: tuple[str, ...]
    optional: bool = False  # missing in the HF checkpoint -> keep the Megatron init (e.g. a new RM head)
    tp_sharded = False

    def hf_names(self, layer: int | None) -> list[str]:
        return [n.format(layer=layer) for n in self.hf]

    def megatron_pattern(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.megatron).replace(r"\{layer\}", r"(\d+)") + "$")

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


FAMILY_MAPPINGS = {"llama": llama_mappings, "qwen2": qwen2_mappings}


def mappings_for(hf_config: Any, reward_head: bool = False) -> list[ParamMapping]:
    """The mapping table for an HF config's family."""
    cfg = hf_config_to_dict(hf_config)
    tied = bool(cfg.get("tie_word_embeddings", False)) and not reward_head
    return FAMILY_MAPPINGS[model_family(cfg)](tied, reward_head)
