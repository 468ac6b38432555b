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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from rao_megatron.models.provider import as_chunks

META_FILE = "rao_model.json"


def prepare_synchronous_save() -> None:
    """Make dist_checkpointing's (synchronous) writer cheap and safe on any machine.

    - Its writer measures RSS with psutil, which megatron-core does not depend on; without it the writer
      child dies and the parent waits forever: report 0 instead.
    - It hands results back through an ``mp.Manager`` started with 'spawn', which re-imports ``__main__``:
      5-10 s per first save on a small machine. Our saves are synchronous (the writer runs in this
      process), so the results never cross a process boundary and a plain queue is enough.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    try:
        import psutil  # noqa: F401
    except ImportError:
        filesystem_async._process_memory = lambda: 0
    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = queue.Queue()


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
    prepare_synchronous_save()
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
    path = resolve_checkpoint(path)
    meta_file = path / META_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"Megatron checkpoint directory not found: {path}")
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a rao_megatron model checkpoint (no {META_FILE}); "
                                "create one with `python -m rao_megatron.convert hf-to-megatron`")
    return json.loads(meta_file.read_text())


@torch.no_grad()
def load_model_checkpoint(chunks: Any, path: str | os.PathLike, *, strict: bool = True,
                          skip_prefixes: tuple[str, ...] = ()) -> None:
    """Load a model checkpoint into this rank's chunks (any TP/PP/VPP layout).

    Parameters whose names start with one of ``skip_prefixes`` are neither read nor required: they keep
    their current values (a reward model initialised from a policy keeps its fresh ``output_layer.``).
    """
    path = resolve_checkpoint(path)
    read_checkpoint_meta(path)
    sharded = model_sharded_state_dict(chunks)
    if skip_prefixes:
        sharded = {name: {k: v for k, v in chunk.items() if not k.startswith(skip_prefixes)}
                   for name, chunk in sharded.items()}
    loaded = dist_checkpointing.load(sharded, str(path))
    for i, chunk in enumerate(as_chunks(chunks)):
        missing, _ = chunk.load_state_dict(loaded[f"model{i}"], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state") and not k.startswith(skip_prefixes)]
        if strict and missing:
            raise KeyError(f"checkpoint {path} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")


# --------------------------------------------------------------------------------------------------
# Training checkpoints: model + optimizer (dist_checkpointing), scheduler, data position, RNG, config
# --------------------------------------------------------------------------------------------------

TRAIN_STATE = "train_state.json"
MANIFEST = "manifest.json"
LATEST = "latest"
RNG_DIR = "rng"
STEP_PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, incomplete, or of another run)."""


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"{STEP_PREFIX}{step:07d}"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A model/training checkpoint directory from itself, a checkpoints root, or its ``latest`` file."""
    p = Path(path)
    if p.is_file() and p.name == LATEST:
        return p.parent / p.read_text().strip()
    if p.is_dir() and not (p / META_FILE).exists() and (p / LATEST).is_file():
        return p / (p / LATEST).read_text().strip()
    return p


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
        "numpy_keys": torch.from_numpy(np_state[1].astype("int64")), "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
        "tracker": dict(get_cuda_rng_tracker().get_states()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate((state["python_version"], tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype("uint32"), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _optimizer_metadata(optimizer: Any) -> dict[str, Any] | None:
    # the reshardable layout of the distributed optimizer (GPU); the plain optimizer needs none
    if getattr(getattr(optimizer, "config", None), "use_distributed_optimizer", False):
        return {"distrib_optim_sharding_type": "fully_reshardable"}
    return None


def _training_sharded_state_dict(chunks: Any, optimizer: Any, is_loading: bool) -> dict[str, Any]:
    state = model_sharded_state_dict(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading,
                                                      metadata=_optimizer_metadata(optimizer))
    return state


def _write_manifest(directory: Path) -> None:
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps(files, indent=1, sort_keys=True))


def verify_checkpoint(directory: str | os.PathLike) -> str | None:
    """None if every file the manifest lists is there with its size; else what is wrong."""
    d = Path(directory)
    manifest = d / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return f"{MANIFEST} is corrupt"
    for name, size in files.items():
        f = d / name
        if not f.is_file():
            return f"file {name} is missing"
        if f.stat().st_size != size:
            return f"file {name} is truncated ({f.stat().st_size} of {size} bytes)"
    return None


def save_training_checkpoint(root: str | os.PathLike, step: int, chunks: Any, optimizer: Any,
                             train_state: dict[str, Any], meta: dict[str, Any], keep_last: int) -> Path:
    """Write ``root/step_NNNNNNN`` atomically (temp dir + rename), point ``root/latest`` at it, prune old ones.

    Collective: every rank calls it. The directory is also a model checkpoint (``rao_model.json``).
    """
    prepare_synchronous_save()
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank0():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)  # empty: dist_checkpointing warns about "corrupted" content otherwise
    _barrier()
    dist_checkpointing.save(_training_sharded_state_dict(chunks, optimizer, is_loading=False), str(tmp))
    if _rank0():
        (tmp / RNG_DIR).mkdir()
    _barrier()
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(_rng_state(), tmp / RNG_DIR / f"rank_{rank:05d}.pt")
    _barrier()
    if _rank0():
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        world = dist.get_world_size() if dist.is_initialized() else 1
        (tmp / TRAIN_STATE).write_text(json.dumps({**train_state, "world_size": world}, indent=2, sort_keys=True))
        _write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        for old in sorted(p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp")
                          )[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def find_resume_checkpoint(root: str | os.PathLike, warn: Any = print) -> Path | None:
    """The newest complete checkpoint under ``root``; incomplete ones are skipped with a warning naming them."""
    root = Path(root)
    if not root.is_dir():
        return None
    for d in sorted((p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp")),
                    reverse=True):
        problem = verify_checkpoint(d)
        if problem is None:
            return d
        warn(f"warning: skipping checkpoint {d}: {problem}; trying the previous one")
    return None


def load_training_checkpoint(path: str | os.PathLike, chunks: Any, optimizer: Any) -> dict[str, Any]:
    """Restore model, optimizer and (same world size) RNG from ``path``; returns its train state."""
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: {problem}")
    state = dist_checkpointing.load(_training_sharded_state_dict(chunks, optimizer, is_loading=True), str(path))
    for i, chunk in enumerate(as_chunks(chunks)):
        chunk.load_state_dict(state[f"model{i}"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    train_state = json.loads((path / TRAIN_STATE).read_text())
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_file = path / RNG_DIR / f"rank_{rank:05d}.pt"
    if train_state.get("world_size") == world and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))  # never unpickle arbitrary objects
    return train_state
