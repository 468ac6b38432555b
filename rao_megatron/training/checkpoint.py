"""Training checkpoints: model + optimizer (dist_checkpointing), scheduler, data position, RNG, config.

A training checkpoint directory is also a model checkpoint (:mod:`rao_megatron.models.checkpoint`):
``rao_model.json`` beside the sharded files, so ``model.init_checkpoint`` and the converters read it.

``train_state.json`` records what the run that wrote it trains (:func:`run_identity`: task, loss and its
settings, initial model; the data stream's own state adds global batch, data seed and data fingerprint);
:func:`check_run` refuses to resume another run's checkpoint unless ``checkpoint.allow_changed_run``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from rao_megatron.config import ConfigError, LossConfig, guarded_write
from rao_megatron.losses import get_loss
from rao_megatron.models.checkpoint import (
    LATEST,
    META_FILE,
    barrier,
    is_global_rank0,
    model_sharded_state_dict,
    prepare_synchronous_save,
)
from rao_megatron.models.provider import as_chunks
from rao_megatron.parallel.compat import apply_compat_shims

TRAIN_STATE = "train_state.json"
MANIFEST = "manifest.json"
RNG_DIR = "rng"
STEP_PREFIX = "step_"
RUN = "run"  #: train_state.json: what the run that wrote the checkpoint trains (:func:`run_identity`)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, incomplete, or of another run)."""


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"{STEP_PREFIX}{step:07d}"


def _rng_state() -> dict[str, Any]:
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
    random.setstate((state["python_version"], tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype("uint32"), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _distributed_optimizers(optimizer: Any) -> list[Any]:
    """The DistributedOptimizer instances in ``optimizer`` (itself or the parts of a ChainedOptimizer)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p for p in parts if isinstance(p, DistributedOptimizer)]


def _optimizer_metadata(optimizer: Any) -> dict[str, Any] | None:
    """How the optimizer state is laid out in a training checkpoint (None: the plain optimizer's own layout).

    The distributed optimizer (GPU) writes Megatron's ``fully_reshardable`` format with
    ``distrib_optim_fully_reshardable_mem_efficient`` (Megatron-LM's ``--dist-ckpt-optim-fully-reshardable
    --distrib-optim-fully-reshardable-mem-efficient``): on save each DP group gathers its optimizer shards
    over *gloo* to DP rank 0 only, in host memory (``get_parameter_state_dp_zero(use_gloo_comm=True,
    return_on_all_ranks=False)``) -- no GPU memory and nothing on the other DP ranks -- and writes them in
    model-parameter space (``optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>``, the model's TP/PP
    sharding), so a checkpoint resumes at any other DP, TP or PP layout. Without the option every DP rank
    all-gathers the whole state over NCCL (~16 GB GPU + ~50 GB host per rank for 8B at TP2). Megatron-LM's
    default, ``dp_reshardable`` (each rank writes its own bucket-space shard, no gather at all), is cheaper
    still but resumes only at the same TP/PP layout (``load_parameter_state_from_dp_reshardable`` asserts
    equal bucket sizes), which would break the TP/PP resharding promised for training checkpoints.
    Loading is unchanged by the option: every rank allocates and reads the whole state of its TP/PP slice
    in host memory (12 bytes per parameter / (TP x PP)) and keeps its own DP shard.
    """
    dist_opts = _distributed_optimizers(optimizer)
    if not dist_opts:
        return None
    # The gloo groups exist unless parallel_state was built with create_gloo_process_groups=False; the
    # NCCL all-gather variant writes the same checkpoint (Megatron treats the two as interchangeable).
    gloo = all(getattr(o, "data_parallel_group_gloo", None) is not None for o in dist_opts)
    return {"distrib_optim_sharding_type": "fully_reshardable",
            "distrib_optim_fully_reshardable_mem_efficient": gloo}


def _written_optimizer_layout(path: Path) -> dict[str, Any] | None:
    """The distributed-optimizer layout a checkpoint was written with; None if a plain optimizer wrote it."""
    common = dist_checkpointing.load_common_state_dict(str(path))
    written = common.get("content_metadata") or {}
    if "distrib_optim_sharding_type" in written:
        return {k: v for k, v in written.items() if k.startswith("distrib_optim_")}
    # no content metadata: the distributed optimizer's own state still names its sharding type

    def sharding_type(d: Any, depth: int = 0) -> str | None:
        if not isinstance(d, dict) or depth > 3:
            return None
        if isinstance(d.get("param_state_sharding_type"), str):
            return d["param_state_sharding_type"]
        return next((t for v in d.values() if (t := sharding_type(v, depth + 1)) is not None), None)

    found = sharding_type(common.get("optimizer"))
    return None if found is None else {"distrib_optim_sharding_type": found}


def _load_optimizer_metadata(path: Path, optimizer: Any) -> dict[str, Any] | None:
    """The layout to read the optimizer state with: the one the checkpoint was written with (as Megatron-LM
    does via ``load_content_metadata``). A checkpoint of the other optimizer kind is refused: the plain and
    the distributed optimizer store their state under different keys."""
    ours = _optimizer_metadata(optimizer)
    written = _written_optimizer_layout(path)
    if (ours is None) != (written is None):
        kind = {True: "the distributed optimizer", False: "the plain (non-distributed) optimizer"}
        raise CheckpointError(
            f"checkpoint {path} holds the state of {kind[written is not None]}, but this run uses "
            f"{kind[ours is not None]} (on by default with CUDA, off on CPU): resume with the optimizer it "
            "was written with, or start afresh and initialise the model from it (model.init_checkpoint)")
    return written


def _common_state_to_compare(common: dict[str, Any]) -> dict[str, Any]:
    """The common (non-sharded) state dist_checkpointing checks is equal on all ranks, without the
    ``param_state: None`` the DP ranks > 0 hold in the mem-efficient format (only DP rank 0 gathers)."""
    opt = common.get("optimizer")
    if isinstance(opt, dict) and "param_state" in opt and opt["param_state"] is None:
        return {**common, "optimizer": {k: v for k, v in opt.items() if k != "param_state"}}
    return common


def trained_keys(chunks: Any) -> Any:
    """Which model entries a training checkpoint holds: all of them, or with a frozen base (LoRA) the trained
    parameters only (adapters, a reward head); the base stays where it came from (``rao_model.json``)."""
    frozen = any(not p.requires_grad for c in as_chunks(chunks) for p in c.parameters())
    if not frozen:
        return None
    names = {n for c in as_chunks(chunks) for n, p in c.named_parameters() if p.requires_grad}
    return names.__contains__


def _training_sharded_state_dict(chunks: Any, optimizer: Any, is_loading: bool,
                                 metadata: dict[str, Any] | None) -> dict[str, Any]:
    state = model_sharded_state_dict(chunks, trained_keys(chunks))
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
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
    # a full disk: one line naming the checkpoint and the cause; the .tmp goes, `latest` and the last good one stay
    with guarded_write(final, "checkpoint", partial=tmp if is_global_rank0() else None):
        if is_global_rank0():
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)  # empty: dist_checkpointing warns about "corrupted" content otherwise
        barrier()
        metadata = _optimizer_metadata(optimizer)
        dist_checkpointing.save(_training_sharded_state_dict(chunks, optimizer, False, metadata), str(tmp),
                                content_metadata=metadata,
                                preprocess_common_before_consistancy_check=_common_state_to_compare)
        if is_global_rank0():
            (tmp / RNG_DIR).mkdir()
        barrier()
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save(_rng_state(), tmp / RNG_DIR / f"rank_{rank:05d}.pt")
        barrier()
        if is_global_rank0():
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            world = dist.get_world_size() if dist.is_initialized() else 1
            (tmp / TRAIN_STATE).write_text(json.dumps({**train_state, "world_size": world}, indent=2,
                                                      sort_keys=True))
            _write_manifest(tmp)
    if is_global_rank0():
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        with guarded_write(root / LATEST, "checkpoint pointer", partial=pointer):
            pointer.write_text(final.name + "\n")
            os.replace(pointer, root / LATEST)
        for old in sorted(p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp")
                          )[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
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


def delete_checkpoints(root: str | os.PathLike) -> int:
    """Remove every checkpoint under ``root`` (complete or not) and ``latest``; returns how many went."""
    root = Path(root)
    steps = [p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir()] if root.is_dir() else []
    for p in steps:
        shutil.rmtree(p)
    (root / LATEST).unlink(missing_ok=True)
    return len(steps)


def loss_identity(loss: LossConfig) -> dict[str, Any]:
    """The loss and each setting of it that changes the objective: its name, its hyper-parameters (the
    loss's own defaults where unset) and, for a loss that reads rewards, ``reward_normalization``. Not the
    reward statistics: they come from the data (a resumed run keeps the checkpoint's)."""
    spec = get_loss(loss.name)
    identity = {"name": loss.name, **spec.defaults, **loss.hparams()}
    if spec.needs_rewards:
        identity["reward_normalization"] = loss.reward_normalization
    return identity


def run_identity(task: str, loss: LossConfig, model: tuple[str, str],
                 peft: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a training checkpoint records of the run that wrote it (:data:`RUN`): ``train.task``,
    :func:`loss_identity`, the initial model's ``(id, source)`` and, for a LoRA run, its adapters' settings
    (``peft``). Global batch, data seed and data fingerprint are the data stream's own state
    (``GroupBatcher.state_dict``). JSON values, as read back."""
    identity = {"task": task, "loss": loss_identity(loss), "model": {"id": model[0], "source": model[1]}}
    if peft is not None:
        identity["peft"] = peft
    return json.loads(json.dumps(identity))


def _shown(value: Any) -> str:
    return "unset" if value is None else str(value)


def _peft_shown(peft: dict[str, Any] | None) -> str:
    if peft is None:
        return "full weights (no LoRA)"
    return "LoRA " + ", ".join(f"{k}={v}" for k, v in sorted(peft.items()))


#: changes no ``checkpoint.allow_changed_run`` can take: LoRA adapters mean nothing on other base weights, and
#: other adapter settings (rank, targets) or full weights are other tensors than the checkpoint holds
ADAPTER_CHANGES = ("peft", "initial model")


def run_changes(saved: dict[str, Any], identity: dict[str, Any], data: dict[str, Any]) -> list[tuple[str, str]]:
    """How this run (``identity``, its batcher's state ``data``) differs from the one that wrote the train
    state ``saved``, the most telling first: task, loss, loss settings, initial model, global batch, data
    seed, data. Each ``(what, "what: X in the checkpoint, Y now")``. A checkpoint written before runs were
    recorded (no :data:`RUN`) is compared on its data stream only."""
    changes: list[tuple[str, str]] = []

    def changed(what: str, then: Any, now: Any) -> None:
        changes.append((what, f"{what}: {_shown(then)} in the checkpoint, {_shown(now)} now"))

    run = saved.get(RUN)
    if run is not None:
        if run["task"] != identity["task"]:
            changed("train.task", run["task"], identity["task"])
        then, now = run["loss"], identity["loss"]
        if then["name"] != now["name"]:
            changed("loss.name", then["name"], now["name"])
        else:  # the same loss: the settings that changed (another loss's settings are not comparable)
            for key in sorted((then.keys() | now.keys()) - {"name"}):
                if then.get(key) != now.get(key):
                    changed(f"loss.{key}", then.get(key), now.get(key))
        if run.get("peft") != identity.get("peft"):
            changed("peft", _peft_shown(run.get("peft")), _peft_shown(identity.get("peft")))
        then, now = run["model"], identity["model"]
        if then["id"] != now["id"]:
            if then["source"] != now["source"]:
                changed("initial model", then["source"], now["source"])
            else:
                changes.append(("initial model", f"initial model: {now['source']} holds other weights than when "
                                                 f"the checkpoint was written (content {then['id'][:12]} then, "
                                                 f"{now['id'][:12]} now)"))
    stream = saved.get("data", {})
    for key, what in (("global_batch_groups", "train.global_batch_groups"), ("seed", "data.seed")):
        if key in stream and stream[key] != data[key]:
            changed(what, stream[key], data[key])
    if "fingerprint" in stream and stream["fingerprint"] != data["fingerprint"]:
        changes.append(("training data", f"training data: other tokenized groups (data fingerprint "
                                         f"{stream['fingerprint']} in the checkpoint, {data['fingerprint']} now)"))
    return changes


def check_run(path: Path, identity: dict[str, Any], data: dict[str, Any], *, chosen: bool, allow: bool,
              note: Any = print) -> None:
    """Refuse to resume ``path`` if another run wrote it (:func:`run_changes`): one line naming the first
    change (checkpoint's value and this run's; the others by name) and the ways out. ``chosen``: the
    checkpoint was named by ``checkpoint.resume`` (else found in ``train.output_dir``). ``allow``
    (``checkpoint.allow_changed_run``): go on, printing every change."""
    saved = json.loads((path / TRAIN_STATE).read_text())
    if RUN not in saved:
        note(f"note: {path} records no task, loss or initial model (written before runs were recorded): "
             "resuming without checking them")
    changes = run_changes(saved, identity, data)
    if not changes:
        return
    lora = saved.get(RUN, {}).get("peft") is not None or identity.get("peft") is not None
    hard = [text for what, text in changes if lora and what in ADAPTER_CHANGES]
    if hard:
        raise ConfigError(f"checkpoint {path} cannot be resumed by this run: {hard[0]}; a LoRA checkpoint resumes "
                          "only with its own base model and adapter settings (start a new train.output_dir, or "
                          "set checkpoint.resume=fresh)")
    if allow:
        note(f"note: continuing {path} on purpose (checkpoint.allow_changed_run): "
             + "; ".join(text for _, text in changes))
        return
    also = f" (also changed: {', '.join(what for what, _ in changes[1:])})" if len(changes) > 1 else ""
    if chosen:
        where = f"checkpoint.resume {path} is a checkpoint of another run"
        ways = (f"start a new run from its weights with model.init_checkpoint={path}, or set "
                "checkpoint.allow_changed_run=true to continue from it on purpose")
    else:
        where = f"train.output_dir {path.parent.parent} holds a checkpoint of another run ({path.name})"
        ways = ("give this run a new train.output_dir, or set checkpoint.resume=fresh to start afresh there "
                "(deleting its checkpoints and metrics) or checkpoint.allow_changed_run=true to continue from "
                "that checkpoint on purpose")
    raise ConfigError(f"{where}: {changes[0][1]}{also}; {ways}")


def load_training_checkpoint(path: str | os.PathLike, chunks: Any, optimizer: Any) -> dict[str, Any]:
    """Restore model, optimizer and (same world size) RNG from ``path``; returns its train state."""
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: {problem}")
    apply_compat_shims()  # a checkpoint of any supported megatron-core release loads under this one
    metadata = _load_optimizer_metadata(path, optimizer)
    state = dist_checkpointing.load(_training_sharded_state_dict(chunks, optimizer, True, metadata), str(path))
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
