"""Model checkpoints in Megatron-Core dist_checkpointing (torch_dist) format, reshardable across TP/PP/VPP.

A model checkpoint directory holds the dist_checkpointing files of the bare (un-wrapped) model chunks —
one flat sharded state dict whose layer keys carry global layer numbers, so it loads at any layout — and
``rao_model.json``: the HF config the architecture comes from, the task (policy / rm) and provenance.
The converters write this format and training reads it (``model.init_checkpoint``).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

from rao_megatron.config import guarded_write
from rao_megatron.models.provider import as_chunks
from rao_megatron.parallel.compat import apply_compat_shims

META_FILE = "rao_model.json"
#: a checkpoints root names its newest complete checkpoint in this file
LATEST = "latest"


def prepare_synchronous_save() -> None:
    """Make dist_checkpointing's (synchronous) writer cheap and safe on any machine.

    - Its writer measures RSS with psutil, which megatron-core does not depend on; without it the writer
      child dies and the parent waits forever: report 0 instead.
    - It hands results back through an ``mp.Manager`` started with 'spawn', which re-imports ``__main__``:
      5-10 s per first save on a small machine. Our saves are synchronous (the writer runs in this
      process), so the results never cross a process boundary and a plain queue is enough.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async  # patched only when a save runs

    try:
        import psutil  # noqa: F401
    except ImportError:
        filesystem_async._process_memory = lambda: 0
    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = queue.Queue()


def model_sharded_state_dict(chunks: Any, select: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """``{"model0": …, "model1": …}``: each bare chunk's sharded state dict (only the entries whose local
    name ``select`` keeps, when given: a LoRA run's adapters).

    The dict keys only organise this rank's view; what is written and matched on load is each
    ShardedTensor's global key (global layer numbers), so any TP/PP/VPP layout reads any other's files.
    """
    return {f"model{i}": {k: v for k, v in chunk.sharded_state_dict().items() if select is None or select(k)}
            for i, chunk in enumerate(as_chunks(chunks))}


def is_global_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model_checkpoint(chunks: Any, path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Write this model (all ranks call it) to an empty or new directory ``path`` via a temp dir + rename.

    A failed write (a full disk) is a one-line ``config.WriteError`` naming ``path`` and the cause; the
    temporary directory is removed and ``path`` keeps what it held (:func:`rao_megatron.config.guarded_write`).
    """
    prepare_synchronous_save()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with guarded_write(path, "model checkpoint", partial=tmp if is_global_rank0() else None):
        if is_global_rank0():
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        dist_checkpointing.save(model_sharded_state_dict(chunks), str(tmp))
        if is_global_rank0():
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    barrier()


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``rao_model.json`` of a model checkpoint, with a clear error if it is not one."""
    path = resolve_checkpoint(path)
    meta_file = path / META_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"Megatron checkpoint directory not found: {path}")
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a rao_megatron model checkpoint (no {META_FILE}); "
                                "create one with `python -m rao_megatron.cli.convert hf-to-megatron`")
    return json.loads(meta_file.read_text())


@torch.no_grad()
def load_model_checkpoint(chunks: Any, path: str | os.PathLike, *, strict: bool = True,
                          skip_prefixes: tuple[str, ...] = (), select: Callable[[str], bool] | None = None) -> None:
    """Load a model checkpoint into this rank's chunks (any TP/PP/VPP layout).

    Parameters whose names start with one of ``skip_prefixes`` are neither read nor required: they keep
    their current values (a reward model initialised from a policy keeps its fresh ``output_layer.``).
    ``select``: read only the parameters whose names it keeps (a LoRA checkpoint's adapters).
    The plain file format only: a LoRA checkpoint is read by ``training.model_init.load_weights``.
    """
    path = resolve_checkpoint(path)
    read_checkpoint_meta(path)
    apply_compat_shims()  # a checkpoint of any supported megatron-core release loads under this one
    sharded = model_sharded_state_dict(chunks, select)
    if skip_prefixes:
        sharded = {name: {k: v for k, v in chunk.items() if not k.startswith(skip_prefixes)}
                   for name, chunk in sharded.items()}
    sharded = match_layer_spec(sharded, stored_keys(path), path)
    loaded = dist_checkpointing.load(sharded, str(path))
    for i, chunk in enumerate(as_chunks(chunks)):
        missing, _ = chunk.load_state_dict(loaded[f"model{i}"], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state") and not k.startswith(skip_prefixes)
                   and (select is None or select(k))]
        if strict and missing:
            raise KeyError(f"checkpoint {path} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")


# The two layer specs name a few entries differently (megatron-core models/gpt/gpt_layer_specs.py). The local
# spec maps its separate norms onto the names of TE's fused LayerNorm-linear layers; the TE spec of a MoE layer
# keeps ``pre_mlp_layernorm`` as a module of its own (the router cannot take a fused norm). Each pair below is
# one parameter under either name.
SPEC_ALIASES: tuple[tuple[str, str], ...] = (
    (".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_"),
    (".input_layernorm.", ".self_attention.linear_qkv.layer_norm_"),
)


def stored_keys(path: str | os.PathLike) -> set[str]:
    """The global keys of every tensor and object a dist_checkpointing checkpoint stores."""
    return {getattr(entry, "key", name) for name, entry in load_sharded_metadata(str(path)).items()}


def _spec_alias(key: str, stored: set[str]) -> str | None:
    """The name ``key`` has in a checkpoint written under the other layer spec, if it is stored there."""
    for a, b in SPEC_ALIASES:
        for old, new in ((a, b), (b, a)):
            if old in key and (renamed := key.replace(old, new)) in stored:
                return renamed
    return None


def match_layer_spec(sharded: dict[str, Any], stored: set[str], path: str | os.PathLike) -> dict[str, Any]:
    """This rank's request ``sharded`` renamed to the keys of a checkpoint written under either layer spec.

    A model checkpoint written with the local spec (CPU, the converters) loads into the Transformer Engine
    spec (GPU training) and back, every family: a parameter stored under the other spec's name (MoE's
    pre-MLP norm) is read from there, and an ``_extra_state`` the checkpoint lacks (TE norms' FP8 metadata,
    which local torch norms do not have) is not requested: the module keeps its fresh one. Values are read
    as stored, bit for bit. Anything else missing is a one-line error naming the checkpoint.
    """
    missing: list[str] = []

    def visit(tree: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, entry in tree.items():
            if isinstance(entry, dict):
                out[name] = visit(entry)
                continue
            key = getattr(entry, "key", None)
            if key is None or key in stored:
                out[name] = entry
            elif (alias := _spec_alias(key, stored)) is not None:
                entry.key = alias
                out[name] = entry
            elif not key.endswith("_extra_state"):
                missing.append(key)
        return out

    matched = visit(sharded)
    if missing:
        raise KeyError(f"checkpoint {path} lacks {sorted(set(missing))[:5]}"
                       f"{' ...' if len(set(missing)) > 5 else ''} (written for another model?)")
    return matched


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A model/training checkpoint directory from itself, a checkpoints root, or its ``latest`` file."""
    p = Path(path)
    if p.is_file() and p.name == LATEST:
        return p.parent / p.read_text().strip()
    if p.is_dir() and not (p / META_FILE).exists() and (p / LATEST).is_file():
        return p / (p / LATEST).read_text().strip()
    return p


def checkpoint_tokenizer(checkpoint: str | os.PathLike) -> str | None:
    """The tokenizer directory a model checkpoint records, else the copy inside it, else None (tiny tokenizer)."""
    path = read_checkpoint_meta(checkpoint).get("tokenizer")
    inside = resolve_checkpoint(checkpoint) / "tokenizer"
    if (path is None or not Path(path).is_dir()) and inside.is_dir():
        path = str(inside)  # the converter copies the tokenizer into the checkpoint: survives a move
    return path
