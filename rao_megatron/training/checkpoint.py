"""Model checkpoints in Megatron-Core dist_checkpointing (torch_dist) format, reshardable across TP/PP/VPP.

A model checkpoint directory holds the dist_checkpointing files of the bare (un-wrapped) model chunks —
one flat sharded state dict whose layer keys carry global layer numbers, so it loads at any layout — and
``rao_model.json``: the HF config the architecture comes from, the task (policy / rm) and provenance.
The converters write this format and training reads it (``model.init_checkpoint``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from rao_megatron.models.provider import as_chunks

META_FILE = "rao_model.json"


def _patch_async_writer_memory_probe() -> None:
    # dist_checkpointing's async writer measures RSS with psutil, which megatron-core does not depend on;
    # without it the writer child dies and the parent waits forever. Report 0 instead.
    try:
        import psutil  # noqa: F401
    except ImportError:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        filesystem_async._process_memory = lambda: 0


def model_sharded_state_dict(chunks: Any) -> dict[str, Any]:
    """``{"model0": …, "model1": …}``: each bare chunk's sharded state dict.

    The dict keys only organise this rank's view; what is written and matched on load is each
    ShardedTensor's global key (global layer numbers), so any TP/PP/VPP layout reads any other's files.
    """
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(as_chunks(chunks))}


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model_checkpoint(chunks: Any, path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Write this model (all ranks call it) to an empty or new directory ``path`` via a temp dir + rename."""
    _patch_async_writer_memory_probe()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if _rank0():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(tmp))
    if _rank0():
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    _barrier()


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``rao_model.json`` of a model checkpoint, with a clear error if it is not one."""
    path = Path(path)
    meta_file = path / META_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"Megatron checkpoint directory not found: {path}")
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a rao_megatron model checkpoint (no {META_FILE}); "
                                "create one with `python -m rao_megatron.convert hf-to-megatron`")
    return json.loads(meta_file.read_text())


@torch.no_grad()
def load_model_checkpoint(chunks: Any, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load a model checkpoint into this rank's chunks (any TP/PP/VPP layout)."""
    read_checkpoint_meta(path)
    sharded = model_sharded_state_dict(chunks)
    loaded = dist_checkpointing.load(sharded, str(path))
    for i, chunk in enumerate(as_chunks(chunks)):
        missing, _ = chunk.load_state_dict(loaded[f"model{i}"], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if strict and missing:
            raise KeyError(f"checkpoint {path} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
