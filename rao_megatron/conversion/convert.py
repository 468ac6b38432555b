"""HF <-> Megatron checkpoint conversion drivers: validate, run the ranks on CPU, write atomically.

``hf_to_megatron`` starts TP x PP forked gloo processes (``run_distributed``; more when expert
parallelism needs data-parallel ranks, :func:`conversion_world_size`); each builds its model shard,
reads only the HF tensors it needs (``LazyHFStateDict``) and writes its part of a torch_dist
checkpoint. ``megatron_to_hf`` loads any layout at TP1/PP1 in one process (dist_checkpointing
reshards) and streams the HF tensors into safetensors shards. The caller's process holds no weights.

A LoRA checkpoint (``rao_model.json`` records ``peft``: a LoRA run's adapters, its base kept elsewhere) is
exported as an HF PEFT adapter folder, or with ``merge_lora`` as the full model with the adapters merged in.
The adapter folder is a documented layout (``adapter_config.json`` + ``adapter_model.safetensors`` under
PEFT's parameter names) that we write ourselves: ``peft`` is a test dependency only (the tests load our
folders with ``PeftModel.from_pretrained``), so exporting on a training cluster needs nothing beyond what
training does.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch.multiprocessing import ProcessRaisedException
from tqdm import tqdm

import rao_megatron
from rao_megatron.conversion.hf_io import (
    DTYPES,
    TOKENIZER_FILES,
    ConversionError,
    LazyHFStateDict,
    ShardedSafetensorsWriter,
    check_output_dir,
    config_dtype,
    copy_tokenizer_files,
    hf_dtype_name,
    parse_size,
    read_hf_config,
    staged_output,
    write_json,
)
from rao_megatron.conversion.validate import (
    check_hf_tensors,
    check_layout,
    config_for_task,
    conversion_world_size,
    task_of,
)
from rao_megatron.models import lora
from rao_megatron.models.checkpoint import read_checkpoint_meta, resolve_checkpoint, save_model_checkpoint
from rao_megatron.models.hf_config import ModelArch, transformer_config_from_hf
from rao_megatron.models.hf_mappings import mappings_for
from rao_megatron.models.hf_state import iter_mapped_params, load_hf_state_dict_into_megatron, rank_dims
from rao_megatron.models.provider import build_gpt_model
from rao_megatron.models.reward import build_reward_model
from rao_megatron.parallel.launch import run_distributed
from rao_megatron.parallel.state import destroy_model_parallel, initialize_model_parallel
from rao_megatron.training.model_init import BASE_KEY, PEFT_KEY, adapter_selector, load_adapters, load_weights
from rao_megatron.training.reference_cache import checkpoint_content_id

#: generous: a rank may wait at a barrier while another reads or writes many GB
RANK_TIMEOUT_S = 3600.0
_USER_ERRORS = ("ConversionError", "ValueError", "KeyError", "FileNotFoundError", "WriteError", "OSError",
                "PermissionError")


def hide_gpus() -> None:
    """Make this process CPU-only: no GPU is visible to it, and torch says so.

    The conversion ranks run here. Launched where GPUs are visible (online GRAO, NeMo-Run's local
    executor, an interactive GPU node) they would otherwise build their models with
    ``use_cpu_initialization=False`` on whatever CUDA device is current, and a rank forked from a parent
    that already asked torch about CUDA could not initialise CUDA at all. ``CUDA_VISIBLE_DEVICES=""``
    hides the GPUs from CUDA itself (and from any child process); a forked rank also inherits torch's
    cached device count, so ``torch.cuda.is_available()`` / ``device_count()`` are pinned to what is now
    true for this process: no CUDA. Then Megatron initialises on the CPU and the CPU patches apply.
    """
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.cuda.is_available = _no_cuda  # type: ignore[assignment]
    torch.cuda.device_count = _no_devices  # type: ignore[assignment]


def _no_cuda() -> bool:
    return False


def _no_devices() -> int:
    return 0


def _cpu_rank(fn: Callable[..., Any], *args: Any) -> None:
    """Entry of every conversion rank: GPUs hidden before anything touches CUDA, then ``fn(*args)``."""
    hide_gpus()
    fn(*args)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Run ``fn(*args)`` on ``world_size`` forked CPU gloo ranks; a user error on a rank re-raises here.

    The ranks never use a GPU, even where the caller sees some (:func:`hide_gpus`); the caller's own
    process is left as it is."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConversionError("run the converter as a plain process, not under torchrun: it starts its own "
                              "tp x pp CPU processes")
    try:
        run_distributed(_cpu_rank, world_size, fn, *args, timeout_s=RANK_TIMEOUT_S)
    except ProcessRaisedException as e:
        # the worker's traceback arrives as text; surface its last line when it is a user error
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        m = re.match(r"^([\w.]+): (.*)$", lines[-1]) if lines else None
        if m and m.group(1).split(".")[-1] in _USER_ERRORS:
            raise ConversionError(m.group(2).strip("\"'")) from e
        raise


def build_chunks(arch: ModelArch, task: str, dtype: torch.dtype) -> list[torch.nn.Module]:
    """This rank's model (one chunk, no VPP) with uninitialised weights: they are all loaded next."""
    config = transformer_config_from_hf(arch, tp=ps.get_tensor_model_parallel_world_size(),
                                        pp=ps.get_pipeline_model_parallel_world_size(),
                                        ep=ps.get_expert_model_parallel_world_size(),
                                        etp=ps.get_expert_tensor_parallel_world_size(), params_dtype=dtype,
                                        perform_initialization=False)
    builder = build_reward_model if task == "rm" else build_gpt_model
    return [builder(arch, config=config, params_dtype=dtype)]


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled or dist.get_rank() != 0)


# ---------------------------------------------------------------- HF -> Megatron


@dataclass(frozen=True)
class _HfToMegatronJob:
    hf_dir: str
    target: str
    tp: int
    pp: int
    task: str
    dtype: str
    arch: ModelArch
    meta: dict[str, Any]
    progress: bool
    ep: int = 1
    etp: int | None = None


def _hf_to_megatron_worker(job: _HfToMegatronJob) -> None:
    initialize_model_parallel(tp=job.tp, pp=job.pp, ep=job.ep, etp=job.etp)
    chunks = build_chunks(job.arch, job.task, DTYPES[job.dtype])
    reads = sum(len(m.hf) for _, _, m, _, _ in iter_mapped_params(chunks, mappings_for(job.arch, job.task == "rm")))
    bar = _progress(reads, "reading HF tensors (rank 0)", job.progress)
    hf = LazyHFStateDict(job.hf_dir, on_read=lambda _name: bar.update())
    load_hf_state_dict_into_megatron(chunks, hf, job.arch)
    bar.close()
    save_model_checkpoint(chunks, job.target, job.meta)
    destroy_model_parallel()


def hf_to_megatron(hf_dir: str | os.PathLike, out: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                   ep: int = 1, etp: int | None = None, dtype: str = "auto", task: str | None = None,
                   progress: bool = True) -> Path:
    """Convert an HF safetensors model directory into a Megatron torch_dist checkpoint at ``out``.

    ``task``: 'policy' or 'rm' (default: 'rm' for ``*ForSequenceClassification``); an RM converted from
    a causal LM keeps a freshly initialised scalar head. ``dtype``: fp32, bf16 or auto (the config's).
    ``ep`` / ``etp``: expert parallel / expert tensor parallel sizes the ranks write at (MoE); the
    checkpoint is reshardable, so any layout reads it.
    """
    hf_dir = Path(hf_dir).resolve()
    source = read_hf_config(hf_dir)
    task = task or task_of(source)
    cfg = config_for_task(source, task)
    arch = check_layout(cfg, tp, pp, ep, etp)  # the architecture, parsed once
    new_head = check_hf_tensors(LazyHFStateDict(hf_dir).shapes(), arch, task, where=f"HF checkpoint {hf_dir}")
    out = check_output_dir(out).resolve()
    dtype = dtype if dtype != "auto" else ("bf16" if config_dtype(cfg) == torch.bfloat16 else "fp32")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected fp32, bf16 or auto")
    has_tokenizer = any((hf_dir / n).is_file() for n in TOKENIZER_FILES)
    meta = {
        "hf_config": cfg,
        "task": task,
        "dtype": dtype,
        # training loads the tokenizer from here (model.init_checkpoint); copied in below
        "tokenizer": str(out / "tokenizer") if has_tokenizer else None,
        "generation_config": _read_json(hf_dir / "generation_config.json"),
        "provenance": {"converter": "rao_megatron.cli.convert hf-to-megatron", "source": str(hf_dir),
                       "written_at_layout": {"tp": tp, "pp": pp, **({"ep": ep, "etp": tp if etp is None else etp}
                                                                   if arch.moe is not None else {})},
                       "rao_megatron": rao_megatron.__version__,
                       "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "new_reward_head": bool(new_head)},
    }
    with staged_output(out) as target:
        run_ranks(_hf_to_megatron_worker, conversion_world_size(tp, pp, ep, etp),
                  _HfToMegatronJob(str(hf_dir), str(target), tp, pp, task, dtype, arch, meta, progress, ep, etp))
        copy_tokenizer_files(hf_dir, target / "tokenizer")
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------- Megatron -> HF


def iter_hf_tensors(chunks: list[torch.nn.Module], arch: ModelArch, task: str,
                    select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every parameter of a TP1/PP1 model (those whose Megatron names ``select`` keeps,
    when given), one at a time (views, no copies). LoRA adapters are not among them (:func:`iter_peft_tensors`)."""
    if ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1 or \
            ps.get_expert_model_parallel_world_size() != 1 or ps.get_expert_tensor_parallel_world_size() != 1:
        raise ValueError("iter_hf_tensors needs the whole model on one rank (TP1 PP1 EP1)")
    dims = rank_dims(arch)
    tied = any(getattr(c, "share_embeddings_and_output_weights", False) for c in chunks)
    for name, param, mapping, layer, expert in iter_mapped_params(chunks, mappings_for(arch, task == "rm"), dims):
        if tied and name == "output_layer.weight":
            continue  # the tied embedding, exported once as model.embed_tokens.weight
        if select is None or select(name):
            yield from zip(mapping.hf_names(layer, expert), mapping.to_hf([param.detach()], dims), strict=True)


@dataclass(frozen=True)
class _MegatronToHfJob:
    checkpoint: str
    target: str
    task: str
    stored_dtype: str
    out_dtype: str
    arch: ModelArch
    max_shard_bytes: int
    progress: bool
    adapter: bool = False  # a LoRA checkpoint's adapters as a PEFT folder (else the whole model, adapters merged)
    base_model: str | None = None  # the adapter folder's base_model_name_or_path


def _megatron_to_hf_worker(job: _MegatronToHfJob) -> None:
    initialize_model_parallel(tp=1, pp=1)
    chunks = build_chunks(job.arch, job.task, DTYPES[job.stored_dtype])
    if job.adapter:
        _write_peft_adapter(chunks, job)
    else:
        load_weights(chunks, job.checkpoint, job.arch, job.task)  # a LoRA checkpoint: base + adapters merged
        total = sum(1 for _ in iter_hf_tensors(chunks, job.arch, job.task))
        writer = ShardedSafetensorsWriter(job.target, job.max_shard_bytes)
        for name, tensor in tqdm(iter_hf_tensors(chunks, job.arch, job.task), total=total, unit="tensor",
                                 desc="writing HF tensors", disable=not job.progress):
            writer.add(name, tensor, dtype=DTYPES[job.out_dtype])
        writer.close()
    destroy_model_parallel()


def _generation_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """What transformers derives from a model config when a model has no generation_config.json."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {"_from_model_config": True, **{k: cfg[k] for k in keys if cfg.get(k) is not None}}


def megatron_to_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "auto",
                   max_shard_size: str | int = "2GB", merge_lora: bool = False, progress: bool = True) -> Path:
    """Export a Megatron model checkpoint (any TP/PP layout) to an HF safetensors directory at ``out``.

    The task (policy -> ``*ForCausalLM``, rm -> ``*ForSequenceClassification``) comes from the
    checkpoint's metadata; ``dtype`` auto keeps the stored dtype. A LoRA checkpoint becomes an HF PEFT
    adapter folder (:func:`iter_peft_tensors`, :func:`peft_adapter_config`), or with ``merge_lora`` the
    full model with its adapters merged in (W + scale · B A on its base); ``merge_lora`` on any other
    checkpoint changes nothing (a note says so).
    """
    checkpoint = resolve_checkpoint(checkpoint).resolve()  # also a training run's checkpoints root / latest
    meta = read_checkpoint_meta(checkpoint)
    if "hf_config" not in meta:
        raise ConversionError(f"{checkpoint}: the checkpoint metadata has no hf_config")
    task = "rm" if meta.get("task") == "rm" else "policy"
    cfg = config_for_task(meta["hf_config"], task)
    arch = ModelArch.from_hf(cfg)
    stored = meta.get("dtype") or ("bf16" if config_dtype(cfg) == torch.bfloat16 else "fp32")
    out_dtype = stored if dtype == "auto" else dtype
    if out_dtype not in DTYPES or stored not in DTYPES:
        raise ConversionError(f"--dtype {out_dtype!r}: expected fp32, bf16 or auto")
    max_bytes = parse_size(max_shard_size)
    if merge_lora and PEFT_KEY not in meta:
        print(f"note: {checkpoint} has no LoRA adapters (--merge-lora changes nothing); exporting it as it is")
    adapter = PEFT_KEY in meta and not merge_lora
    base_model = _adapter_base(checkpoint, meta, arch) if adapter else None
    out = check_output_dir(out).resolve()
    with staged_output(out) as target:
        run_ranks(_megatron_to_hf_worker, 1, _MegatronToHfJob(str(checkpoint), str(target), task, stored, out_dtype,
                                                              arch, max_bytes, progress, adapter, base_model))
        if not adapter:
            out_cfg = dict(cfg, dtype=hf_dtype_name(DTYPES[out_dtype]))
            if "torch_dtype" in out_cfg:
                out_cfg["torch_dtype"] = out_cfg["dtype"]
            write_json(target / "config.json", out_cfg)
            if task == "policy":
                write_json(target / "generation_config.json",
                           meta.get("generation_config") or _generation_config(cfg))
        # the converter puts a copy inside the checkpoint; a training run records its tokenizer path
        tokenizer_src = checkpoint / "tokenizer" if (checkpoint / "tokenizer").is_dir() else meta.get("tokenizer")
        if not copy_tokenizer_files(tokenizer_src, target):
            print(f"note: no tokenizer found for {checkpoint}; copy the tokenizer files into {out} yourself")
    return out


# ---------------------------------------------------------------- Megatron LoRA -> HF PEFT adapter folder

#: the files of an HF PEFT adapter folder, as ``PeftModel.save_pretrained`` names them
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
#: the prefix PEFT's saved keys carry: the HF model's parameter names inside ``PeftModel.base_model.model``
PEFT_PREFIX = "base_model.model."
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"


def iter_peft_tensors(chunks: list[torch.nn.Module], arch: ModelArch, task: str,
                      own: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    """(PEFT key, tensor) of a TP1/PP1 model's LoRA adapters, then of the other parameters its LoRA checkpoint
    holds (``own`` keeps their Megatron names: a reward model's head, saved as PEFT saves ``modules_to_save``).

    Each adapter is split as the mapping table splits the weight it adapts: B's rows go where the weight's
    rows go (fused QKV -> q/k/v per query group, a gated fc1 -> gate/up) and every part keeps the whole A
    (the parts share the input), so ``B_q A x`` is exactly the q rows of ``B A x``; a row-parallel linear
    (o_proj, down_proj) maps one to one. Expert adapters map per expert (the checkpoint-file layout; see
    :func:`_adapter_base` for why they are not exported).
    """
    dims = rank_dims(arch)
    table = [(m.megatron_pattern(), m) for m in mappings_for(arch, task == "rm")]
    for name, (a, b) in lora.full_adapter_tensors(chunks).items():
        mapping, found = next((m, hit) for pattern, m in table if (hit := pattern.match(f"{name}.weight")))
        expert = found.groupdict().get("expert")
        hf_names = mapping.hf_names(int(found["layer"]), None if expert is None else int(expert))
        for hf_name, b_part in zip(hf_names, mapping.to_hf([b], dims), strict=True):
            module = PEFT_PREFIX + hf_name.removesuffix(".weight")
            yield module + _LORA_A, a
            yield module + _LORA_B, b_part
    for hf_name, tensor in iter_hf_tensors(chunks, arch, task, select=own):
        yield PEFT_PREFIX + hf_name, tensor


def peft_adapter_config(spec: lora.LoraSpec, task: str, keys: Iterable[str], base_model: str | None) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT LoRA adapter whose weights file holds ``keys``: the fields
    ``LoraConfig`` reads, with PEFT's defaults for the rest. The scale is PEFT's plain ``lora_alpha / r``
    (``use_rslora`` false), as ours; ``target_modules`` and ``modules_to_save`` are the modules the file
    holds (HF names: q_proj ... down_proj; score, the head of a reward model)."""
    keys = [k.removeprefix(PEFT_PREFIX) for k in keys]
    adapted = {k.removesuffix(_LORA_A).rsplit(".", 1)[-1] for k in keys if k.endswith(_LORA_A)}
    saved = {k.rsplit(".", 1)[0] for k in keys if not k.endswith((_LORA_A, _LORA_B))}
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    return {"peft_type": "LORA", "task_type": "SEQ_CLS" if task == "rm" else "CAUSAL_LM",
            "base_model_name_or_path": base_model, "revision": None, "inference_mode": True,
            "r": spec.rank, "lora_alpha": alpha, "lora_dropout": spec.dropout, "target_modules": sorted(adapted),
            "modules_to_save": sorted(saved) or None, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}


def _write_peft_adapter(chunks: list[torch.nn.Module], job: _MegatronToHfJob) -> None:
    """The adapter folder of LoRA checkpoint ``job.checkpoint``: only its own entries are read (no base)."""
    meta = read_checkpoint_meta(job.checkpoint)
    spec = lora.LoraSpec.from_dict(meta[PEFT_KEY])
    for chunk in chunks:
        lora.apply_lora(chunk, spec)
    load_adapters(chunks, job.checkpoint)
    writer = ShardedSafetensorsWriter(job.target, max_shard_bytes=sys.maxsize)  # PEFT reads one file
    keys = []
    for key, tensor in iter_peft_tensors(chunks, job.arch, job.task, adapter_selector(meta)):
        writer.add(key, tensor, dtype=DTYPES[job.out_dtype])
        keys.append(key)
    target = Path(job.target)
    os.replace(writer.close()[0], target / ADAPTER_WEIGHTS)
    write_json(target / ADAPTER_CONFIG, peft_adapter_config(spec, job.task, keys, job.base_model))


def _adapter_base(checkpoint: Path, meta: dict[str, Any], arch: ModelArch) -> str | None:
    """The adapter folder's ``base_model_name_or_path``: the HF directory the LoRA checkpoint's base was
    converted from, else None with a note saying what the base is and how to get it in HF form.

    Refused before any work: adapters on routed experts (transformers 5 holds a Qwen3-MoE layer's experts
    fused in 3-D parameters, which PEFT's LoRA does not wrap as linears; the merged export has them), and a
    base checkpoint whose content changed since training (the adapters fit only the weights they were
    trained on; a base that is gone is only a note: the adapters do not need it).
    """
    spec = lora.LoraSpec.from_dict(meta[PEFT_KEY])
    if arch.moe is not None and spec.experts and {"linear_fc1", "linear_fc2"} & set(spec.targets):
        raise ConversionError(f"{checkpoint}: its LoRA adapters on MoE experts have no HF PEFT form (transformers "
                              "fuses the experts into 3-D tensors that PEFT's LoRA does not wrap); export the "
                              "merged model with --merge-lora")
    base = meta[BASE_KEY]
    source = base.get("checkpoint")
    if source is None:
        print(f"note: the adapter's base model is the {base.get('source', 'random init')}, which has no HF copy; "
              "--merge-lora exports base and adapters as one model")
        return None
    if not Path(source).is_dir():
        print(f"note: the adapter's base model {source} is not there; base_model_name_or_path left empty")
        return None
    if checkpoint_content_id(source) != base["id"]:
        raise ConversionError(f"LoRA checkpoint {checkpoint}: its base model {source} holds other weights than the "
                              "adapters were trained on")
    provenance = read_checkpoint_meta(source).get("provenance") or {}
    if "hf-to-megatron" in str(provenance.get("converter")) and provenance.get("source"):
        return str(provenance["source"])
    print(f"note: the adapter's base model is the Megatron checkpoint {source}; export it with megatron-to-hf "
          "(with --merge-lora if it is a LoRA checkpoint itself) and load the adapter onto that")
    return None
