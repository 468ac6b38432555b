"""Apply the mapping tables to this rank's model chunks: fill them from an HF state dict, gather them back.

In memory only; files, dist_checkpointing and streaming live on top of these functions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from rao_megatron.models.hf_mappings import ModelDims, ParamMapping, mappings_for
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


def _match(name: str, table: list[tuple[Any, ParamMapping]]) -> tuple[ParamMapping, int | None] | None:
    for pattern, mapping in table:
        m = pattern.match(name)
        if m:
            return mapping, (int(m.group(1)) if m.groups() else None)
    return None


def iter_mapped_params(chunks: list[torch.nn.Module], mappings: list[ParamMapping],
                       ) -> Iterator[tuple[str, torch.nn.Parameter, ParamMapping, int | None]]:
    """(name, param, mapping, global layer) for every parameter of this rank's chunks, in a fixed order."""
    table = [(m.megatron_pattern(), m) for m in mappings]
    for chunk in chunks:
        layer_numbers = _global_layer_numbers(chunk)
        for name, param in chunk.named_parameters():
            found = _match(name, table)
            if found is None:
                raise KeyError(f"no HF mapping for Megatron parameter {name!r}")
            mapping, local = found
            yield name, param, mapping, (layer_numbers[local] if local is not None else None)


@torch.no_grad()
def load_hf_state_dict_into_megatron(model_or_chunks: Any, hf_state_dict: Mapping[str, torch.Tensor],
                                     hf_config: Any) -> list[str]:
    """Copy this rank's shards (TP slice, this stage's layers) of an HF state dict into the model.

    Returns the names of Megatron parameters left at their init because an optional HF tensor was
    absent (e.g. a new reward head). Raises KeyError if a required HF tensor is missing.
    """
    chunks = as_chunks(model_or_chunks)
    dims = ModelDims.from_hf(hf_config, ps.get_tensor_model_parallel_world_size(),
                             ps.get_tensor_model_parallel_rank())
    kept_init = []
    for name, param, mapping, layer in iter_mapped_params(chunks, mappings_for(hf_config,
                                                                               _is_reward_model(chunks))):
        hf_names = mapping.hf_names(layer)
        missing = [n for n in hf_names if n not in hf_state_dict]
        if missing:
            if mapping.optional:
                kept_init.append(name)
                continue
            raise KeyError(f"HF state dict lacks {missing} (needed for Megatron {name!r})")
        value = mapping.to_megatron([hf_state_dict[n] for n in hf_names], dims)
        if value.shape != param.shape:
            raise ValueError(f"{name}: mapped shape {tuple(value.shape)} != parameter shape {tuple(param.shape)}")
        param.copy_(value)
    return kept_init


def _gather_tp(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensor of every TP rank, in rank order."""
    group = ps.get_tensor_model_parallel_group()
    world = dist.get_world_size(group)
    if world == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


@torch.no_grad()
def megatron_to_hf_shard(model_or_chunks: Any, hf_config: Any) -> dict[str, torch.Tensor]:
    """HF tensors (full, TP-gathered, on CPU) for the layers and modules of this PP stage.

    Collective over the TP group: every TP rank must call it.
    """
    chunks = as_chunks(model_or_chunks)
    reward = _is_reward_model(chunks)
    dims = ModelDims.from_hf(hf_config, ps.get_tensor_model_parallel_world_size(),
                             ps.get_tensor_model_parallel_rank())
    tied = any(getattr(c, "share_embeddings_and_output_weights", False) for c in chunks)
    out: dict[str, torch.Tensor] = {}
    for name, param, mapping, layer in iter_mapped_params(chunks, mappings_for(hf_config, reward)):
        if tied and name == "output_layer.weight":
            continue  # the last stage's copy of the tied embedding; the first stage exports it
        shards = _gather_tp(param.detach()) if mapping.tp_sharded else [param.detach()]
        for hf_name, tensor in zip(mapping.hf_names(layer), mapping.to_hf(shards, dims), strict=True):
            out[hf_name] = tensor.to("cpu", copy=True).contiguous()
    return out


def megatron_to_hf_state_dict(model_or_chunks: Any, hf_config: Any) -> dict[str, torch.Tensor]:
    """The full HF state dict on every rank (TP all-gather, then PP merge). For tied models no ``lm_head``.

    Collective over the TP and PP groups. Holds the whole model in CPU memory on every rank: fine for
    small models and tests; large exports should write per-stage shards instead.
    """
    local = megatron_to_hf_shard(model_or_chunks, hf_config)
    group = ps.get_pipeline_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return local
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return merged
