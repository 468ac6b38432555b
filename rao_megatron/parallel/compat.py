"""Megatron-Core version differences, all in one place.

Supported and tested in CI: megatron-core 0.16.1 (Python 3.11) through the newest 0.19.x (Python 3.12)
(``docs/support_matrix.md``). Everything that differs between those releases and matters to this package
is handled here, each shim with the release that needs it, so that raising the floor means deleting
shims, not hunting for ``try/except ImportError`` through the code.

What differs, and where it is handled:

- **Checkpoint common state** (here, :func:`apply_compat_shims`). Since 0.19 ``dist_checkpointing.save``
  stores the common (non-tensor) state -- optimizer param groups, content metadata -- as one
  ``ShardedObject("common_state")`` inside the torch_dist files and writes no ``common.pt``; 0.19 still
  reads ``common.pt`` of older checkpoints. Releases before 0.19 read ``common.pt`` only, so on those a
  checkpoint written under 0.19 would not load. The shim teaches their loader 0.19's format.
- **MoE router without Transformer Engine** (here, :func:`moe_router_gemm_without_te`). 0.16's
  ``moe_utils`` defines ``te_general_gemm`` only when TE imports, yet the router reads it always; from
  0.17 on it is None without TE.
- **MoE metrics tracker** (here, :func:`moe_metric_entry`). Since 0.18 Megatron keeps the per-layer MoE
  metrics (the router's load-balancing loss) in ``moe_logging.get_moe_metrics_tracker()``; before, in the
  dict of ``moe_utils.get_moe_layer_wise_logging_tracker()`` (deprecated since, a view of the new one).
- **MoE routing that ignores padding tokens** (here, :func:`gpt_forward_takes_padding_mask`).
  ``GPTModel.forward(..., padding_mask=...)`` (keyword-only; ``[b, s]`` bool, True at padding) reaches every
  MoE router, which then leaves padding tokens out of the load-balancing loss (and the z-loss and the
  expert-bias token counts); token routing itself is unchanged. 0.16.1 (this package's floor) and 0.19.2
  both have it, with the same name and meaning (read in both sources); a release without it counts
  padding tokens, as this package did before passing the mask. Detected from the signature, once.
- **Distributed-optimizer checkpoints of multi-bucket buffers** (here,
  :func:`fix_fully_reshardable_multi_bucket_save`). ``DistributedOptimizer``'s ``fully_reshardable`` save
  slices the DP-gathered optimizer state, which ``get_parameter_state_dp_zero`` packs with every bucket's
  end padding stripped, at the buffer's padded parameter offsets: once DDP splits a buffer into several
  buckets (``overlap_grad_reduce``, on with CUDA) and a bucket end is padded, every later parameter's
  state is written from the wrong place (fixed upstream by Megatron-LM PR #5077, 2026-05; 0.16.1 has the
  bug). Detected from the source, applied when the trainer builds its optimizer.
- **CUDA streams in DDP's grad sync** (CPU path only, in :mod:`rao_megatron.parallel.cpu`). Since 0.19
  ``param_and_grad_buffer.start_grad_sync`` calls ``torch.cuda.current_stream()`` every step; the CPU
  patches give the patched modules in-order stream / event stand-ins (harmless on older releases).

Read but not adopted: 0.18 added ``GPTModel.forward(..., output_processor=...)``, a hook that receives
the final hidden states and the output layer / weight. It could replace our output-layer forward swap
(``models.provider.enable_hidden_state_output``) only once 0.16/0.17 are dropped; until then it would be
a second code path beside the one that works on every supported release (``docs/support_matrix.md``).
"""

from __future__ import annotations

import functools
import inspect
import io
import os
import re
from typing import Any

import megatron.core
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

_APPLIED = False


def mcore_version(text: str | None = None) -> tuple[int, int, int]:
    """The installed megatron-core release (or ``text``'s) as a tuple: ``"0.19.2+a482880"`` -> ``(0, 19, 2)``."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", megatron.core.__version__ if text is None else text)
    if match is None:
        raise ValueError(f"unreadable megatron-core version {text or megatron.core.__version__!r}")
    major, minor, patch = (int(g or 0) for g in match.groups())
    return major, minor, patch


def mcore_at_least(*release: int) -> bool:
    """Whether the installed megatron-core is at least ``release``, e.g. ``mcore_at_least(0, 19)``."""
    return mcore_version() >= tuple(release)


# --- megatron-core < 0.17: the MoE router's TE GEMM name without TE --------------------------------------


def moe_router_gemm_without_te() -> None:
    """megatron-core < 0.17: define ``moe_utils.te_general_gemm`` as None where TE did not import (the router
    then computes its logits with a torch matmul, as 0.17+ does by itself); a no-op elsewhere."""
    if mcore_at_least(0, 17):
        return
    from megatron.core.transformer.moe import moe_utils  # megatron: only when this shim runs

    moe_utils.__dict__.setdefault("te_general_gemm", None)


# --- megatron-core 0.18: the MoE metrics tracker moved to moe_logging ------------------------------------


def moe_metric_entry(name: str) -> tuple[Any, Any]:
    """(per-layer values, reduce group) of one of Megatron's MoE metrics, e.g. ``"load_balancing_loss"``;
    (None, None) when no MoE layer has recorded it."""
    if mcore_at_least(0, 18):
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker  # megatron >= 0.18 only

        entry = get_moe_metrics_tracker().metrics.get(name)
        return (entry.values, entry.reduce_group) if entry is not None else (None, None)
    # 0.16 / 0.17: a plain dict of {"values": tensor, "reduce_group": group, ...}
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker  # megatron < 0.18

    old = get_moe_layer_wise_logging_tracker().get(name)
    return (old["values"], old.get("reduce_group")) if old else (None, None)


# --- MoE routers that leave padding tokens out (GPTModel.forward's padding_mask) ----------------------------


@functools.cache
def gpt_forward_takes_padding_mask() -> bool:
    """Whether the installed ``GPTModel.forward`` takes ``padding_mask`` (True at padding tokens), which MoE
    routers use to leave padding out of the load-balancing loss. Without it padding tokens count there."""
    from megatron.core.models.gpt import GPTModel  # megatron: only when this shim runs

    return "padding_mask" in inspect.signature(GPTModel.forward).parameters


# --- megatron-core < 0.19: read 0.19's common state from the torch_dist files -------------------------

#: the ShardedObject key 0.19 stores the common state under (``serialization.save``)
_COMMON_STATE_KEY = "common_state"
_LEGACY_COMMON_FILE = "common.pt"


def _common_state_unique_key() -> str:
    from megatron.core.dist_checkpointing.mapping import ShardedObject  # megatron: only when this shim runs

    return ShardedObject(_COMMON_STATE_KEY, None, (1,), (0,)).unique_key


def has_torch_dist_common_state(checkpoint_dir: str | os.PathLike) -> bool:
    """Whether a torch_dist checkpoint holds its common state inside its files (megatron-core >= 0.19)."""
    try:
        metadata = FileSystemReader(str(checkpoint_dir)).read_metadata()
    except (FileNotFoundError, OSError):
        return False
    return _common_state_unique_key() in metadata.state_dict_metadata


def read_torch_dist_common_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The common state a megatron-core >= 0.19 checkpoint stores inside its torch_dist files.

    Reads what 0.19's ``dist_checkpointing.load_common_state_dict`` reads; the stored bytes are opened with
    ``torch.load(weights_only=True)``, as older releases open ``common.pt`` (torch's ``.metadata`` file of
    every torch_dist checkpoint is a plain pickle all the same: load only checkpoints you trust).
    """
    class _RawBytesPlanner(DefaultLoadPlanner):
        """Copies the stored bytes into the caller's buffer (the default planner unpickles them freely)."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            self.state_dict[read_item.dest_index.fqn].write(value.read())

    key = _common_state_unique_key()
    state: dict[str, Any] = {key: io.BytesIO()}
    dcp_load(state, storage_reader=FileSystemReader(str(checkpoint_dir)),
             planner=_RawBytesPlanner(flatten_state_dict=False), no_dist=True)
    stream = state[key]
    stream.seek(0)
    return torch.load(stream, map_location="cpu", weights_only=True)[0]  # saved as [data]


def _patch_common_state_loading() -> None:
    """megatron-core < 0.19: ``TorchCommonLoadStrategy.load_common`` reads ``common.pt`` only; where a
    checkpoint has none but holds 0.19's ``common_state`` object, read that instead."""
    # megatron: only when this shim runs
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    original = TorchCommonLoadStrategy.load_common

    @functools.wraps(original)
    def load_common(self: Any, checkpoint_dir: Any) -> Any:
        if (not os.path.exists(os.path.join(str(checkpoint_dir), _LEGACY_COMMON_FILE))
                and has_torch_dist_common_state(checkpoint_dir)):
            return read_torch_dist_common_state(checkpoint_dir)
        return original(self, checkpoint_dir)

    TorchCommonLoadStrategy.load_common = load_common


def apply_compat_shims() -> None:
    """Apply the shims the installed megatron-core needs (idempotent; the same on CPU and GPU).

    Call before reading a dist_checkpointing checkpoint."""
    global _APPLIED
    if _APPLIED:
        return
    if not mcore_at_least(0, 19):
        _patch_common_state_loading()
    _APPLIED = True


def fix_fully_reshardable_multi_bucket_save() -> bool:
    """Make ``DistributedOptimizer``'s ``fully_reshardable`` save read each parameter's state from its place.

    ``get_parameter_state_dp_zero`` returns the gathered state of a buffer as the concatenation of each
    bucket's unpadded part; ``sharded_param_state_fully_reshardable`` slices it at ``param_index_map``
    offsets, which count the padding at the end of every earlier bucket. The patch puts each bucket's part
    back at its offset in the buffer (zeros in the padding) before the slicing. Applied only to the
    releases whose save still slices the unpadded state (the zero-padding workaround in its source);
    idempotent. Returns whether the installed release needs it.
    """
    # megatron: only when this shim runs
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.sharded_param_state_fully_reshardable
    if getattr(original, "_rao_multi_bucket_fix", False):
        return True
    if "missing_elems_num" not in inspect.getsource(original):
        return False

    def at_buffer_offsets(optimizer: Any, state: dict | None) -> dict | None:
        if state is None:
            return None
        for gbuf_idx, buffer in enumerate(optimizer.buffers):
            for world in state[gbuf_idx].values():
                for key, packed in list(world.items()):
                    if not isinstance(packed, torch.Tensor):
                        continue  # numel_unpadded
                    padded = packed.new_zeros(buffer.numel)
                    start = 0
                    for bucket in buffer.buckets:
                        n = bucket.numel_unpadded
                        padded[bucket.offset:bucket.offset + n] = packed[start:start + n]
                        start += n
                    world[key] = padded
        return state

    @functools.wraps(original)
    def sharded_param_state_fully_reshardable(self: Any, *args: Any, **kwargs: Any) -> Any:
        gather = self.get_parameter_state_dp_zero
        self.get_parameter_state_dp_zero = lambda *a, **k: at_buffer_offsets(self, gather(*a, **k))
        try:
            return original(self, *args, **kwargs)
        finally:
            del self.get_parameter_state_dp_zero

    sharded_param_state_fully_reshardable._rao_multi_bucket_fix = True  # type: ignore[attr-defined]
    DistributedOptimizer.sharded_param_state_fully_reshardable = sharded_param_state_fully_reshardable
    return True
