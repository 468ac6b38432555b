"""Apply the mapping tables to this rank's model chunks: fill them from an HF state dict, gather them back.

In memory only; files, dist_checkpointing and streaming live on top of these functions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from rao_megatron.models.hf_config import ModelArch
from rao_megatron.models.hf_mappings import ModelDims, ParamMapping, hf_checkpoint_layout, mappings_for
from rao_megatron.models.provider import as_chunks
from rao_megatron.models.reward import ScalarHead


def _is_reward_model(chunks: list[torch.nn.Module]) -> bool:
    return any(isinstance(getattr(c, "output_layer", None), ScalarHead) for c in chunks)


def _global_layer_numbers(chunk: torch.nn.Module) -> list[int]:
    """Global 0-based index of each of the chunk's local decoder layers."""
    decoder = getattr(chunk, "decoder", None)
    if decoder is None:
        return []
    # layer_number is 1-based and already includes the PP/VPP offset in every megatron-core version.
    return [layer.layer_number - 1 for layer in decoder.layers]


def _match(name: str, table: list[tuple[Any, ParamMapping]]
           ) -> tuple[ParamMapping, int | None, int | None] | None:
    """(mapping, chunk-local layer, local expert) of the first pattern matching ``name``."""
    for pattern, mapping in table:
        m = pattern.match(name)
        if m:
            groups = m.groupdict()
            layer, expert = groups.get("layer"), groups.get("expert")
            return mapping, (int(layer) if layer is not None else None), (int(expert) if expert is not None else None)
    return None


def rank_dims(arch: ModelArch) -> ModelDims:
    """The model's sizes and this rank's place in the TP, EP and expert-TP groups."""
    return arch.dims.placed(ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
                            ep_size=ps.get_expert_model_parallel_world_size(),
                            ep_rank=ps.get_expert_model_parallel_rank(),
                            etp_size=ps.get_expert_tensor_parallel_world_size(),
                            etp_rank=ps.get_expert_tensor_parallel_rank())


def iter_mapped_params(chunks: list[torch.nn.Module], mappings: list[ParamMapping], dims: ModelDims | None = None,
                       ) -> Iterator[tuple[str, torch.nn.Parameter, ParamMapping, int | None, int | None]]:
    """(name, param, mapping, global layer, global expert) for every parameter of this rank's chunks, in a
    fixed order. ``dims`` (default: a single rank's) turns a local expert index into the global one. LoRA
    adapters are not base parameters and are skipped (``models.lora`` maps them)."""
    table = [(m.megatron_pattern(), m) for m in mappings]
    for chunk in chunks:
        layer_numbers = _global_layer_numbers(chunk)
        for name, param in chunk.named_parameters():
            if getattr(param, "is_lora", False):
                continue
            found = _match(name, table)
            if found is None:
                raise KeyError(f"no HF mapping for Megatron parameter {name!r}")
            mapping, local, expert = found
            if expert is not None:
                expert = dims.global_expert(expert) if dims is not None else expert
            yield name, param, mapping, (layer_numbers[local] if local is not None else None), expert


@torch.no_grad()
def load_hf_state_dict_into_megatron(model_or_chunks: Any, hf_state_dict: Mapping[str, torch.Tensor],
                                     arch: ModelArch) -> list[str]:
    """Copy this rank's shards (TP slice, this stage's layers) of an HF state dict into the model.

    Returns the names of Megatron parameters left at their init because an optional HF tensor was
    absent (e.g. a new reward head). Raises KeyError if a required HF tensor is missing. A transformers-5
    in-memory state dict with fused experts is read per expert (:func:`hf_checkpoint_layout`).
    """
    chunks = as_chunks(model_or_chunks)
    arch = ModelArch.from_hf(arch)  # transitional: tests pass transformers configs
    dims = rank_dims(arch)
    hf_state_dict = hf_checkpoint_layout(hf_state_dict)
    kept_init = []
    table = mappings_for(arch, _is_reward_model(chunks))
    for name, param, mapping, layer, expert in iter_mapped_params(chunks, table, dims):
        hf_names = mapping.hf_names(layer, expert)
        missing = [n for n in hf_names if n not in hf_state_dict]
        if missing:
            if mapping.optional:
                kept_init.append(name)
                continue
            raise KeyError(f"HF state dict lacks {missing} (needed for Megatron {name!r})")
        value = mapping.to_megatron([hf_state_dict[n] for n in hf_names], dims.for_experts() if mapping.is_expert
                                    else dims)
        if value.shape != param.shape:
            raise ValueError(f"{name}: mapped shape {tuple(value.shape)} != parameter shape {tuple(param.shape)}")
        param.copy_(value)
    return kept_init


def _gather_tp(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """The tensor of every rank of ``group`` (default: the TP group), in rank order."""
    group = group if group is not None else ps.get_tensor_model_parallel_group()
    world = dist.get_world_size(group)
    if world == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


@torch.no_grad()
def megatron_to_hf_shard(model_or_chunks: Any, arch: ModelArch) -> dict[str, torch.Tensor]:
    """HF tensors (full, TP-gathered, on CPU) for the layers and modules of this PP stage.

    Collective over the TP group (and, for MoE, the expert TP and expert-parallel groups): every rank of
    the stage must call it.
    """
    chunks = as_chunks(model_or_chunks)
    reward = _is_reward_model(chunks)
    arch = ModelArch.from_hf(arch)  # transitional: tests pass transformers configs
    dims = rank_dims(arch)
    tied = any(getattr(c, "share_embeddings_and_output_weights", False) for c in chunks)
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, torch.Tensor] = {}  # this EP rank's experts, ETP-gathered
    for name, param, mapping, layer, expert in iter_mapped_params(chunks, mappings_for(arch, reward), dims):
        if tied and name == "output_layer.weight":
            continue  # the last stage's copy of the tied embedding; the first stage exports it
        if mapping.is_expert:
            group, mdims, target = ps.get_expert_tensor_parallel_group(), dims.for_experts(), experts
        else:
            group, mdims, target = ps.get_tensor_model_parallel_group(), dims, out
        shards = _gather_tp(param.detach(), group) if mapping.tp_sharded else [param.detach()]
        for hf_name, tensor in zip(mapping.hf_names(layer, expert), mapping.to_hf(shards, mdims), strict=True):
            target[hf_name] = tensor.to("cpu", copy=True).contiguous()
    if dims.ep_size > 1:  # every EP rank holds other experts
        parts: list[Any] = [None] * dims.ep_size
        dist.all_gather_object(parts, experts, group=ps.get_expert_model_parallel_group())
        experts = {k: v for part in parts for k, v in part.items()}
    out.update(experts)
    return out


def megatron_to_hf_state_dict(model_or_chunks: Any, arch: ModelArch) -> dict[str, torch.Tensor]:
    """The full HF state dict on every rank (TP all-gather, then PP merge). For tied models no ``lm_head``.

    Collective over the TP and PP groups. Holds the whole model in CPU memory on every rank: fine for
    small models and tests; large exports should write per-stage shards instead.
    """
    local = megatron_to_hf_shard(model_or_chunks, arch)
    group = ps.get_pipeline_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return local
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return merged
