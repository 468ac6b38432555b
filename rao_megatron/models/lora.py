"""LoRA adapters on Megatron-Core's linear layers, laid out like the layers they adapt (TP, SP, PP, EP).

A target linear ``W`` (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``, in attention, dense MLPs and,
with ``experts``, every routed expert) gets ``y = W x + (alpha / r) · B A dropout(x)`` (Hu et al. 2021, as HF PEFT's
``LoraLayer``: A ~ U(±1/√in), B = 0, so a fresh adapter leaves the model as it was). The base parameters keep
their names and checkpoint keys: the adapter is a child module ``lora`` (parameters ``lora.A`` [r, in] and
``lora.B`` [out, r]) of the linear, whose class is swapped for a subclass that adds the adapter's output
(:func:`apply_lora`). Local (CPU) and Transformer Engine linears are handled alike; a TE linear with a fused
norm (``TELayerNormColumnParallelLinear``) feeds the adapter the normalised input, recomputed from its own
norm weight.

Parallel layout, chosen so that every adapter computation is complete on each rank (no partial gradient is
left for Megatron to reduce, so nothing depends on which parameters its reductions know about):

- column-parallel W (output split over TP): A [r, in] whole on every TP rank, B [out/tp, r] split like W. The
  adapter's hidden ``h = A x`` enters the TP region (its gradient is all-reduced), so A's gradient and the
  gradient into x are whole on every rank; under sequence parallelism x is gathered first, and its gradient
  split back, not reduce-scattered.
- row-parallel W (input split over TP): A [r, in/tp] split like W, B [out, r] whole. ``h`` is summed over TP in
  the forward; under sequence parallelism the output is scattered along the sequence like W's.
- experts whose communication the token dispatcher does (``explicit_expert_comm``: a column layer's input
  gradient and a row layer's output are summed over the expert-TP group by the dispatcher) get the same
  adapter with that sum undone (1/tp on the input gradient, on the row output).

Checkpoint keys are the layer's own prefix + ``lora.A`` / ``lora.B``, sharded along the same TP axis as W (the
gated ``linear_fc1``'s B split into its gate and up halves, as Megatron splits W), with global layer and expert
numbers: an adapter checkpoint resumes at any TP/PP/EP layout. The initial A is drawn from a generator seeded
by the run seed and the adapter's global name, then sliced: every layout starts from the same adapters.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from rao_megatron.config import LORA_TARGETS
from rao_megatron.models.provider import as_chunks

TARGETS = LORA_TARGETS


@dataclass(frozen=True)
class LoraSpec:
    """What LoRA adds to a model: rank r, alpha (scale alpha / r), dropout on the adapter input, the target
    linears (Megatron names) and whether routed experts get adapters."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    experts: bool = True

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA target modules must be among {', '.join(TARGETS)}; got {list(self.targets)}")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(self.targets)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraSpec:
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d.get("dropout", 0.0)),
                   targets=tuple(d.get("targets", TARGETS)), experts=bool(d.get("experts", True)))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


class _ScaleForward(torch.autograd.Function):
    """Multiplies by ``factor`` forward; the gradient passes unchanged (its sum over ranks is taken later)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        return x * factor

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _tp_group(linear: torch.nn.Module) -> Any:
    """The tensor-parallel group a linear is split over (the expert-TP group for expert linears): Megatron's
    TE wrappers keep it as ``_tp_group`` (TE's own ``tp_group`` is None where Megatron does the expert
    communication itself), the local linears as ``tp_group``."""
    for attr in ("_tp_group", "tp_group"):
        group = getattr(linear, attr, None)
        if group is not None:
            return group
    return ps.get_tensor_model_parallel_group()


class LoraAdapter(torch.nn.Module):
    """``scale · B A dropout(x)`` for one linear, with the linear's TP layout (module docstring)."""

    def __init__(self, *, row: bool, in_local: int, out_local: int, spec: LoraSpec, group: Any,
                 sequence_parallel: bool, explicit_comm: bool, gated: bool, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.row, self.group, self.gated = row, group, gated
        self.tp = group.size() if group is not None else 1
        self.sequence_parallel = sequence_parallel and not explicit_comm
        self.explicit_comm = explicit_comm and self.tp > 1
        self.scale = spec.scale
        self.enabled = True
        self.dropout = spec.dropout
        r = spec.rank
        a_cols = in_local  # row: this rank's input slice; column: the whole input
        b_rows = out_local  # column: this rank's output slice; row: the whole output
        self.A = torch.nn.Parameter(torch.zeros(r, a_cols, dtype=dtype, device=device))
        self.B = torch.nn.Parameter(torch.zeros(b_rows, r, dtype=dtype, device=device))
        sharded, dim = (self.A, 1) if row else (self.B, 0)
        sharded.tensor_model_parallel, sharded.partition_dim, sharded.partition_stride = self.tp > 1, dim, 1
        for p in (self.A, self.B):
            p.is_lora = True
            if p is not sharded:
                p.tensor_model_parallel = False

    @property
    def sharded_axis(self) -> tuple[str, int]:
        """The parameter split over TP and its axis: row layers split A's input columns, column layers B's rows."""
        return ("A", 1) if self.row else ("B", 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        group = self.group
        if self.row:
            h = reduce_from_tensor_model_parallel_region(F.linear(x, self.A), group=group)
            y = F.linear(h, self.B) * self.scale
            if self.explicit_comm:  # the dispatcher sums the expert-TP ranks' outputs
                return _ScaleForward.apply(y, 1.0 / self.tp)
            if self.sequence_parallel:
                y = scatter_to_sequence_parallel_region(y, group=group)
            return y
        if self.explicit_comm:  # the dispatcher sums the expert-TP ranks' input gradients
            x = _ScaleGrad.apply(x, 1.0 / self.tp)
        elif self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=group)
        h = copy_to_tensor_model_parallel_region(F.linear(x, self.A), group=group)
        return F.linear(h, self.B) * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict[str, Any]:
        name, axis = self.sharded_axis
        out = make_sharded_tensors_for_checkpoint(
            {"A": self.A, "B": self.B}, prefix, {name: axis}, sharded_offsets, tp_group=self.group,
            dp_cp_group=(metadata or {}).get("dp_cp_group"))
        if self.gated:  # B's rows are [gate; up] of this rank: split like the gated linear_fc1's weight
            key = f"{prefix}B"
            out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets,
                                                    (metadata or {}).get("singleton_local_shards", False))
        return out

    def delta(self) -> torch.Tensor:
        """``scale · B A``: this rank's slice of the update to the adapted weight (its shape)."""
        return (self.B.float() @ self.A.float()) * self.scale


def _fused_norm(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The normalised input of a TE linear with a fused norm (``TELayerNormColumnParallelLinear``)."""
    weight = linear.layer_norm_weight
    if getattr(linear, "zero_centered_gamma", False):
        weight = weight + 1
    eps = getattr(linear, "eps", 1e-5)
    if str(getattr(linear, "normalization", "LayerNorm")) == "RMSNorm":
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, getattr(linear, "layer_norm_bias", None), eps)


class _LoraLinear:
    """Mixed in before a Megatron linear's own class (:func:`apply_lora`): its output plus the adapter's,
    and the adapter's sharded checkpoint entries in place of the generic ones the linear would make."""

    lora: LoraAdapter

    def forward(self, input_: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        output, bias = super().forward(input_, *args, **kwargs)
        if not self.lora.enabled:
            return output, bias
        x = _fused_norm(self, input_) if hasattr(self, "layer_norm_weight") else input_
        return output + self.lora(x).to(output.dtype), bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict[str, Any]:
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for key in [k for k in out if k.startswith(f"{prefix}lora.")]:
            del out[key]
        out.update(self.lora.sharded_state_dict(f"{prefix}lora.", sharded_offsets, metadata))
        return out


_LORA_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type:
    if cls not in _LORA_CLASSES:
        _LORA_CLASSES[cls] = type(f"Lora{cls.__name__}", (_LoraLinear, cls), {"_lora_base_class": cls})
    return _LORA_CLASSES[cls]


def is_row_parallel(linear: torch.nn.Module) -> bool:
    name = type(linear).__name__
    if "RowParallel" in name:
        return True
    if "ColumnParallel" in name:
        return False
    raise ValueError(f"LoRA adapts Megatron's column/row-parallel linears, not {type(linear).__name__}")


def _global_names(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(global name, linear)`` of every LoRA-capable linear: the global name carries the global
    layer number (pipeline stages) and the global expert number (expert parallelism)."""
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", [])
    ep_rank = ps.get_expert_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    for i, layer in enumerate(layers):
        number = int(getattr(layer, "layer_number", i + 1)) - 1
        for sub, module in layer.named_modules():
            leaf = sub.rsplit(".", 1)[-1]
            if leaf not in TARGETS:
                continue
            global_sub = sub
            if ".local_experts." in f".{sub}":
                experts = layer.mlp.experts
                head, tail = sub.split("local_experts.", 1)
                local, rest = tail.split(".", 1)
                global_sub = f"{head}local_experts.{ep_rank * experts.num_local_experts + int(local)}.{rest}"
            yield f"decoder.layers.{number}.{global_sub}", module


def apply_lora(model: torch.nn.Module, spec: LoraSpec, *, seed: int = 0) -> int:
    """Add LoRA adapters to ``model`` (a bare ``GPTModel`` chunk) in place; returns how many linears got one.

    Only the adapters are new: every base parameter keeps its name, value and checkpoint key. Freezing the
    base is the caller's (:func:`freeze_base`).
    """
    count = 0
    for global_name, linear in _global_names(model):
        leaf = global_name.rsplit(".", 1)[-1]
        if leaf not in spec.targets or (".experts." in global_name and not spec.experts):
            continue
        if isinstance(linear, _LoraLinear):
            raise ValueError(f"{global_name} already has a LoRA adapter")
        row = is_row_parallel(linear)
        weight = linear.weight
        if weight is None or weight.dim() != 2:
            raise ValueError(f"LoRA needs the 2-D weight of {global_name} (a grouped expert linear? set "
                             "peft.experts=false or run the sequential expert MLPs)")
        group = _tp_group(linear)
        out_local, in_local = weight.shape
        gated = leaf == "linear_fc1" and bool(getattr(getattr(linear, "config", None), "gated_linear_unit", False))
        adapter = LoraAdapter(row=row, in_local=in_local, out_local=out_local, spec=spec, group=group,
                              sequence_parallel=bool(getattr(linear, "sequence_parallel", False)),
                              explicit_comm=bool(getattr(linear, "explicit_expert_comm", False)),
                              gated=gated, dtype=weight.dtype, device=weight.device)
        _init_adapter(adapter, global_name, seed)
        for p in (adapter.A, adapter.B):  # an expert's adapter is reduced like the expert (``allreduce=False``)
            p.allreduce = getattr(weight, "allreduce", True)
        linear.__class__ = _lora_class(type(linear))
        linear.lora = adapter
        count += 1
    return count


def _rank_slice(full: torch.Tensor, adapter: LoraAdapter, name: str) -> torch.Tensor:
    """This rank's slice of a whole (TP1) adapter tensor ``name`` (A or B) of ``adapter``."""
    split, axis = adapter.sharded_axis
    if name != split or adapter.tp == 1:
        return full
    rank = adapter.group.rank()
    if adapter.gated:  # [gate; up]: this rank holds its slice of each half
        return torch.cat([h.chunk(adapter.tp, dim=axis)[rank] for h in full.chunk(2, dim=axis)], dim=axis)
    return full.chunk(adapter.tp, dim=axis)[rank]


def _gather_full(local: torch.Tensor, adapter: LoraAdapter, name: str) -> torch.Tensor:
    """The whole (TP1) adapter tensor from this rank's slice (collective over the linear's TP group)."""
    split, axis = adapter.sharded_axis
    if name != split or adapter.tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(adapter.tp)]
    torch.distributed.all_gather(parts, local.contiguous(), group=adapter.group)
    if adapter.gated:
        halves = [p.chunk(2, dim=axis) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=axis)
    return torch.cat(parts, dim=axis)


@torch.no_grad()
def _init_adapter(adapter: LoraAdapter, global_name: str, seed: int) -> None:
    """A ~ U(-1/√in, 1/√in) as ``nn.Linear`` (PEFT's default, kaiming-uniform with a=√5), drawn whole from a
    generator seeded by ``seed`` and the adapter's global name, then sliced; B = 0."""
    in_full = adapter.A.shape[1] * (adapter.tp if adapter.row else 1)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(global_name.encode())) % 2**63)
    bound = 1.0 / math.sqrt(in_full)
    full = torch.empty(adapter.A.shape[0], in_full).uniform_(-bound, bound, generator=gen)
    adapter.A.copy_(_rank_slice(full, adapter, "A"))
    adapter.B.zero_()


def adapters(model_or_chunks: Any) -> Iterator[tuple[str, LoraAdapter]]:
    """``(global name of the adapted linear, adapter)`` of every LoRA adapter in a model or its chunks."""
    for chunk in as_chunks(model_or_chunks):
        for global_name, linear in _global_names(chunk):
            if isinstance(linear, _LoraLinear):
                yield global_name, linear.lora


def freeze_base(model: torch.nn.Module, *, trainable: tuple[str, ...] = ()) -> None:
    """Train the LoRA adapters only (and parameters whose names start with one of ``trainable``: the reward
    model's head)."""
    for name, param in model.named_parameters():
        param.requires_grad_(bool(getattr(param, "is_lora", False)) or name.startswith(trainable))


@contextlib.contextmanager
def adapters_disabled(model_or_chunks: Any) -> Iterator[None]:
    """The base model: every adapter off inside the block (the reference of a LoRA run)."""
    found = [a for _, a in adapters(model_or_chunks)]
    for a in found:
        a.enabled = False
    try:
        yield
    finally:
        for a in found:
            a.enabled = True


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key names a LoRA adapter parameter."""
    return ".lora." in f".{key}"


def _remove_adapter(linear: torch.nn.Module) -> LoraAdapter:
    """Take a linear's adapter off (its own class back); returns the adapter."""
    adapter = linear.lora
    del linear.lora
    linear.__class__ = linear._lora_base_class
    return adapter


@contextlib.contextmanager
def stashed_adapters(model_or_chunks: Any) -> Iterator[None]:
    """The model without its adapters inside the block; they are put back after it (whatever adapters were
    added or merged inside). Loading another LoRA checkpoint's adapters to merge them uses it."""
    stash = []
    for chunk in as_chunks(model_or_chunks):
        for _, linear in list(_global_names(chunk)):
            if isinstance(linear, _LoraLinear):
                cls = type(linear)
                stash.append((linear, _remove_adapter(linear), cls))
    try:
        yield
    finally:
        for linear, adapter, cls in stash:
            if isinstance(linear, _LoraLinear):
                _remove_adapter(linear)
            linear.__class__ = cls
            linear.lora = adapter


@torch.no_grad()
def merge_lora(model_or_chunks: Any) -> int:
    """Fold every adapter into its linear's weight (W += scale · B A) and remove it: the plain model that
    computes what the adapted one did. Returns how many were merged."""
    count = 0
    for chunk in as_chunks(model_or_chunks):
        for _, linear in list(_global_names(chunk)):
            if not isinstance(linear, _LoraLinear):
                continue
            delta = _remove_adapter(linear).delta()
            linear.weight.add_(delta.to(linear.weight.dtype))
            count += 1
    return count


@torch.no_grad()
def full_adapter_tensors(model_or_chunks: Any, *, of: str = "data") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{global linear name: (A, B)}`` with the whole (TP1) tensors of this rank's adapters (collective
    over each linear's TP group); B of a gated ``linear_fc1`` as ``[gate; up]`` rows. ``of="main_grad"``:
    their gradients as Megatron's DDP accumulated them, instead of their values."""
    def get(p: torch.Tensor) -> torch.Tensor:
        return p.detach() if of == "data" else getattr(p, of).detach()

    return {name: (_gather_full(get(a.A), a, "A"), _gather_full(get(a.B), a, "B"))
            for name, a in adapters(model_or_chunks)}


@torch.no_grad()
def set_full_adapter_tensors(model_or_chunks: Any, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set this rank's adapters from whole (TP1) tensors ``{global linear name: (A, B)}``."""
    for name, a in adapters(model_or_chunks):
        if name in tensors:
            full_a, full_b = tensors[name]
            a.A.copy_(_rank_slice(full_a.to(a.A.dtype), a, "A"))
            a.B.copy_(_rank_slice(full_b.to(a.B.dtype), a, "B"))


def random_full_adapters(model_or_chunks: Any, *, std: float = 0.2) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Non-zero whole (TP1) adapter tensors for every adapter of a model, drawn from each adapter's global name:
    the same at every layout and spec (for equivalence tests and the GPU check, where a fresh B = 0 would
    give A no gradient and make every comparison pass trivially). Set them with :func:`set_full_adapter_tensors`."""
    out = {}
    for name, a in adapters(model_or_chunks):
        in_full = a.A.shape[1] * (a.tp if a.row else 1)
        out_full = a.B.shape[0] * (1 if a.row else a.tp)
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        out[name] = (torch.randn(a.A.shape[0], in_full, generator=gen) * std,
                     torch.randn(out_full, a.B.shape[1], generator=gen) * std)
    return out

