"""Run Megatron-Core (local layer spec) on a CPU-only torch over gloo: tests, tiny runs, the quick-start.

Megatron-Core assumes CUDA in a handful of places. ``apply_cpu_patches()`` fixes exactly those and
nothing else; on a machine with CUDA it does nothing. What it changes, and why:

1. ``torch.cuda.current_device()`` returns the CPU device: Megatron passes it as ``device=`` to the
   buffers it allocates (GlobalMemoryBuffer, TP all-gather outputs, p2p receive buffers, DDP buffers).
2. The model-parallel RNG tracker (``CudaRNGStatesTracker``) keeps CPU generator states, so
   ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` (weight init, dropout) work.
3. Modules that hard-code ``device="cuda"`` in tensor factories (pipeline schedules, p2p, causal masks,
   DDP buffers, optimizer, grad clipping) see a ``torch`` whose factories map cuda to cpu, whose
   ``torch.cuda.synchronize`` / ``empty_cache`` are no-ops and whose ``torch.cuda`` streams and events
   (``current_stream``, ``default_stream``, ``stream``, ``Stream``, ``Event``) are in-order stand-ins, so
   a CUDA build of torch on a machine without GPUs never initialises CUDA (megatron-core 0.19's DDP grad
   sync asks for the current stream). Only those modules' global name ``torch`` is replaced; the rest of
   the process keeps the real module.
4. Tied embeddings with PP>1: ``LanguageModule.setup_embeddings_and_output_layer`` calls ``.cuda()``
   on the shared weight; during that call only, ``Tensor.cuda`` returns the tensor itself.
5. Gradient clipping: ``clip_grad_by_total_norm_fp32`` asserts ``grad.type() == 'torch.cuda.FloatTensor'``
   and the fallback l2-norm (``megatron.core.utils.local_multi_tensor_l2_norm``, used when TE and apex
   are absent) returns its result on cuda. Both are replaced in ``megatron.core.optimizer`` by the same
   computation without the device (fp32 grads are still required).
6. The optimizers' constructors choose the fp32 / fp16 path by ``param.type() == 'torch.cuda.FloatTensor'``;
   while (and only while) they run, ``Tensor.type()`` names a CPU tensor like its CUDA counterpart.
7. Distributed-optimizer checkpoints with torch's Adam (what Megatron falls back to without TE / apex
   FusedAdam, so always on CPU) hit three bugs in its ``HAVE_APEX_OR_TE = False`` branches, all about
   the per-parameter ``step`` tensor torch's Adam keeps (FusedAdam keeps it in the param groups):
   ``DistributedOptimizer.state_dict`` asserts that those tensors hold exactly one value, which fails on
   a fresh optimizer (no state yet) -- the state ``sharded_state_dict(is_loading=True)`` calls it in, so
   no checkpoint could be loaded; there the step is 0 (where torch's Adam starts).
   ``_set_main_param_and_optimizer_states`` copies every state entry from the loaded tensors, which
   never hold ``step`` (the fully_reshardable loader skips it: it comes from the param groups) -> KeyError;
   the entry keeps its value. And ``load_state_dict`` puts one shared ``step`` tensor into every
   parameter's state, which torch's Adam increments in place once per parameter (``step_t += 1``), so
   after a resume the bias correction would run ahead by #params per step; each parameter gets its copy.

With these, DDP + ``get_megatron_optimizer`` (fp32 Adam or bf16 parameters with fp32 master weights,
clip_grad > 0, optionally the distributed optimizer and its checkpoints) run on CPU without a global
TorchFunctionMode. ``sequence_parallel`` still needs TE or apex.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from collections.abc import Iterator
from typing import Any

import torch

_APPLIED = False

# Megatron modules whose `torch` global is swapped for the cuda->cpu proxy. Every one exists (and imports
# torch) in megatron-core 0.16.1 through 0.19.x; a release that renames one fails here, loudly.
_PATCHED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.transformer.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.rerun_state_machine",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
)

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "rand", "randn",
              "randint", "zeros_like", "ones_like", "empty_like", "full_like")


def _is_cuda_device(device: Any) -> bool:
    """True for "cuda", "cuda:N", torch.device("cuda") and bare ints (= cuda:N)."""
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_factory(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)  # pinning needs CUDA too
        return fn(*args, **kwargs)

    return wrapper


class _CpuEvent:
    """A CUDA event on CPU: work is done in order when it is queued, so an event is always complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


class _CpuStream:
    """A CUDA stream on CPU: every operation runs in program order, so waits and syncs are no-ops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        return None

    def wait_stream(self, stream: Any) -> None:
        return None

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    @staticmethod
    def priority_range() -> tuple[int, int]:
        return 0, 0


_CPU_STREAM = _CpuStream()


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as the patched modules see it: device-sync calls are no-ops, streams and events are
    stand-ins. None of these may reach the real ``torch.cuda``: with a CUDA build of torch on a machine
    without GPUs, its stream calls initialise CUDA (an error, and in a forked gloo worker "Cannot
    re-initialize CUDA in forked subprocess"). Megatron-Core 0.19's DDP grad sync
    (``param_and_grad_buffer.start_grad_sync``) calls ``torch.cuda.current_stream()`` on every step."""

    Stream = _CpuStream
    Event = _CpuEvent

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def synchronize(*args: Any, **kwargs: Any) -> None:
        return None

    @staticmethod
    def current_stream(*args: Any, **kwargs: Any) -> _CpuStream:
        return _CPU_STREAM

    @staticmethod
    def default_stream(*args: Any, **kwargs: Any) -> _CpuStream:
        return _CPU_STREAM

    @staticmethod
    def stream(stream: Any = None) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")


class _CpuTorch(types.ModuleType):
    """``torch`` as the patched modules see it: tensor factories map a cuda device to cpu."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda("torch.cuda")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _patch_rng_tracker() -> None:
    """Make every ``CudaRNGStatesTracker`` (also ones created later) keep CPU generator states."""
    from megatron.core.tensor_parallel import random as mrandom  # megatron: only when the CPU patches apply

    def add(self: Any, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self: Any, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

    mrandom.CudaRNGStatesTracker.add = add
    mrandom.CudaRNGStatesTracker.fork = fork
    # Activation recomputation saves/restores "the cuda RNG state": use the CPU generator instead.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_tied_embedding_setup() -> None:
    """``setup_embeddings_and_output_layer`` moves the tied weight with ``.cuda()`` when PP>1."""
    # megatron: only when the CPU patches apply
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(original)
    def setup(self: Any, *args: Any, **kwargs: Any) -> Any:
        saved = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = saved

    LanguageModule.setup_embeddings_and_output_layer = setup


def _clip_grad_by_total_norm_fp32(parameters: Any, max_norm: float, total_norm: float,
                                  use_decoupled_grad: bool = False) -> None:
    """Scale fp32 grads in place by ``max_norm / total_norm`` when that is < 1 (Megatron's, on any device)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    allowed = (torch.float32, torch.bfloat16) if use_decoupled_grad else (torch.float32,)
    for g in grads:
        assert g.dtype in allowed, f"gradient clipping expects {allowed} grads, got {g.dtype}"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.detach().mul_(clip_coeff)


def _l2_norm(chunk_size: int, noop_flag: Any, tensor_lists: list[list[torch.Tensor]], per_tensor: bool,
             *args: Any) -> tuple[torch.Tensor, None]:
    """Drop-in for ``amp_C.multi_tensor_l2norm``: (l2 norm of all tensors as ``[1]`` fp32, None)."""
    norms = [torch.linalg.vector_norm(t.float()) for tensors in tensor_lists for t in tensors]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    return total.reshape(1).float(), None


def _patch_grad_clipping() -> None:
    from megatron.core.optimizer import clip_grads  # megatron: only when the CPU patches apply
    from megatron.core.utils import local_multi_tensor_l2_norm

    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _l2_norm
    for name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        mod = importlib.import_module(name)
        if hasattr(mod, "clip_grad_by_total_norm_fp32"):
            mod.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """Within the block, ``tensor.type()`` of a CPU tensor reads as its CUDA counterpart.

    Megatron's optimizers pick the fp32 / fp16 code path by ``param.type() == 'torch.cuda.FloatTensor'``.
    """
    saved = torch.Tensor.type

    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = saved(self, *args, **kwargs)
        if args or kwargs or not isinstance(name, str) or self.device.type != "cpu":
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = saved  # type: ignore[method-assign]


def _patch_optimizer_type_checks() -> None:
    """Run the optimizers' constructors (where the dtype checks live) under ``_cuda_type_names``."""
    from megatron.core.optimizer import optimizer  # megatron: only when the CPU patches apply
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    classes = [optimizer.Float16OptimizerWithFloat16Params, DistributedOptimizer]

    def under_cuda_type_names(original: Any) -> Any:
        @functools.wraps(original)
        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            with _cuda_type_names():
                original(self, *args, **kwargs)

        return init

    for cls in classes:
        cls.__init__ = under_cuda_type_names(cls.__init__)


def _patch_distributed_optimizer_torch_adam_step() -> None:
    """Item 7 of the module docstring: the ``step`` of torch's Adam inside the distributed optimizer."""
    from megatron.core.optimizer import distrib_optimizer  # megatron: only when the CPU patches apply

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return  # FusedAdam keeps ``step`` in its param groups; those branches are not taken
    cls = distrib_optimizer.DistributedOptimizer
    original_state_dict, original_load_state_dict = cls.state_dict, cls.load_state_dict
    original_set_states = cls._set_main_param_and_optimizer_states

    @functools.wraps(original_state_dict)
    def state_dict(self: Any) -> Any:
        inner = self.optimizer
        if len(inner.state) > 0 or getattr(self.ddp_config, "use_megatron_fsdp", False):
            return original_state_dict(self)
        # fresh optimizer: Megatron reads the step from the per-parameter state torch's Adam has not
        # created yet; give it step 0 for the duration of the call and leave the state empty again
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param]["step"] = torch.tensor(0.0)
        try:
            return original_state_dict(self)
        finally:
            inner.state.clear()

    @functools.wraps(original_set_states)
    def set_main_param_and_optimizer_states(self: Any, model_param: Any, tensors: dict[str, Any]) -> None:
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}  # the step is set from the param groups, not here
        original_set_states(self, model_param, tensors)

    @functools.wraps(original_load_state_dict)
    def load_state_dict(self: Any, state_dict: Any) -> None:
        original_load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()  # one tensor per parameter, as torch's Adam has

    cls.state_dict = state_dict
    cls._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states
    cls.load_state_dict = load_state_dict


def apply_cpu_patches() -> bool:
    """Patch Megatron-Core for CPU-only torch; idempotent, a no-op with CUDA. Returns True if patched."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    _patch_rng_tracker()
    proxy = _CpuTorch()
    for name in _PATCHED_MODULES:
        mod = importlib.import_module(name)
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy
    _patch_tied_embedding_setup()
    _patch_grad_clipping()
    _patch_optimizer_type_checks()
    _patch_distributed_optimizer_torch_adam_step()
    _APPLIED = True
    return True


def cpu_patches_applied() -> bool:
    """Whether ``apply_cpu_patches`` has patched this process."""
    return _APPLIED
