"""How a run's model starts: the HF architecture, the dtype, and the initial weights (checkpoint or random)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rao_megatron.config import Config, ConfigError
from rao_megatron.models import lora
from rao_megatron.models.checkpoint import load_model_checkpoint, read_checkpoint_meta, resolve_checkpoint
from rao_megatron.models.hf_config import ModelArch, check_expert_layout, tiny_hf_config
from rao_megatron.models.hf_state import load_hf_state_dict_into_megatron
from rao_megatron.models.provider import as_chunks, set_moe_aux_loss_coeff
from rao_megatron.parallel.startup import log0
from rao_megatron.training.engine import build_model_chunks
from rao_megatron.training.reference_cache import checkpoint_content_id

#: rao_model.json of a LoRA checkpoint: its adapters (``lora.LoraSpec`` + the seed they were drawn with) and
#: the base model they adapt (``{"checkpoint": dir or None, "id": content id, "source": ..., "seed": ...}``)
PEFT_KEY, BASE_KEY = "peft", "base"

PRESET_FAMILIES = {"tiny-llama": "llama", "tiny-qwen2": "qwen2", "tiny-qwen3": "qwen3", "tiny-qwen3-moe": "qwen3_moe"}


def model_dir(cfg: Config) -> str | None:
    """The HF model directory of this run, if any (architecture and default tokenizer)."""
    if cfg.model.hf_config is None:
        return None
    p = Path(cfg.model.hf_config)
    return str(p.parent if p.name == "config.json" else p)


def resolve_arch(cfg: Config, tokenizer: Any) -> ModelArch:
    """The architecture of this run's model, parsed once from :func:`resolve_hf_config`."""
    return ModelArch.from_hf(resolve_hf_config(cfg, tokenizer))


def resolve_hf_config(cfg: Config, tokenizer: Any) -> Any:
    """The HF config the Megatron model is built from (checkpoint metadata, HF directory, or tiny preset)."""
    if cfg.model.init_checkpoint:
        meta = read_checkpoint_meta(cfg.model.init_checkpoint)
        return AutoConfig.for_model(**meta["hf_config"])
    if cfg.model.hf_config:
        path = model_dir(cfg)
        if not Path(path, "config.json").is_file():
            raise ConfigError(f"config key 'model.hf_config': no config.json in {path}")
        return AutoConfig.from_pretrained(path, local_files_only=True)
    family = PRESET_FAMILIES[cfg.model.preset]
    return tiny_hf_config(family, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def check_model_layout(cfg: Config, arch: ModelArch, task: str = "policy") -> None:
    """The parallel layout against the model, before anything is built: experts divisible by
    ``parallel.ep``, the expert width by ``parallel.etp``, MoE training with TP > 1 only with sequence
    parallelism (Megatron's MoE layer refuses it otherwise, at the first training step; forward-only
    passes, ``task`` reference, run)."""
    p = cfg.parallel
    arch = ModelArch.from_hf(arch)  # transitional: tests pass transformers configs
    try:
        check_expert_layout(arch, tp=p.tp, ep=p.ep, etp=p.etp)
    except ValueError as e:
        raise ConfigError(f"config key '{'parallel.ep' if p.ep > 1 else 'parallel.etp'}': {e}") from None
    if arch.moe is not None and p.tp > 1 and not p.sequence_parallel and task != "reference":
        raise ConfigError("config key 'parallel.tp': Megatron trains MoE layers at tp > 1 only with "
                          "parallel.sequence_parallel=true (Transformer Engine, CUDA); on CPU use tp=1 with "
                          "parallel.ep / parallel.etp / parallel.pp")


def moe_aux_loss_coeff(cfg: Config, arch: ModelArch) -> float | None:
    """The router load-balancing coefficient of this run (None for a dense model): ``model.moe_aux_loss_coeff``
    or the HF config's ``router_aux_loss_coef``."""
    moe = ModelArch.from_hf(arch).moe  # transitional: tests pass transformers configs
    if moe is None:
        return None
    return moe.router_aux_loss_coef if cfg.model.moe_aux_loss_coeff is None else cfg.model.moe_aux_loss_coeff


def params_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32


@torch.no_grad()
def init_random_weights(chunks: Any, arch: ModelArch, seed: int) -> None:
    """Random init that does not depend on the TP/PP layout: an HF model seeded on CPU, mapped in.

    Megatron's own init draws a different stream per TP rank, so a tiny run at TP1 and TP2 would start
    from different weights; going through the HF layout makes every layout start identically.
    """
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(arch.to_transformers(), dtype=torch.float32)
        load_hf_state_dict_into_megatron(chunks, model.state_dict(), arch)
    finally:
        torch.random.set_rng_state(state)


def init_skip_prefixes(init_checkpoint: str, task: str) -> tuple[str, ...]:
    """What not to load from ``init_checkpoint`` into a ``task`` model: a policy's vocab head into a reward model.

    A policy checkpoint's ``output_layer`` is the ``[V, H]`` vocab projection (or absent, when tied to
    the embedding); the reward model's is a ``[1, H]`` scalar head. Read as is, dist_checkpointing would
    copy vocab row 0 into the head, so the head keeps its fresh initialisation instead. A reward-model
    checkpoint (``task: rm``) loads whole, head included.
    """
    source = read_checkpoint_meta(init_checkpoint).get("task", "policy")
    if task == "rm" and source != "rm":
        log0(f"reward model from the '{source}' checkpoint {init_checkpoint}: transformer weights loaded, "
             "its vocab output layer dropped, scalar head freshly initialised")
        return ("output_layer.",)
    if task != "rm" and source == "rm":
        raise ConfigError(f"config key 'model.init_checkpoint': {init_checkpoint} is a reward model "
                          f"(task rm); a {task} model needs a policy checkpoint")
    return ()


def lora_spec(cfg: Config) -> lora.LoraSpec | None:
    """The run's LoRA adapters (``peft``), or None when every weight trains."""
    p = cfg.peft
    if p.method != "lora":
        return None
    return lora.LoraSpec(rank=p.rank, alpha=p.alpha, dropout=p.dropout, targets=tuple(p.target_modules),
                         experts=p.experts)


def lora_meta(cfg: Config, model_id: tuple[str, str]) -> dict[str, Any]:
    """What a LoRA run's checkpoints record in ``rao_model.json`` besides the model's own entries: the
    adapters and the base model (the initial model: ``model_id`` from ``reference.model_identity``)."""
    spec = lora_spec(cfg)
    if spec is None:
        return {}
    init = cfg.model.init_checkpoint
    return {PEFT_KEY: {"method": "lora", **spec.to_dict(), "seed": cfg.train.seed},
            BASE_KEY: {"checkpoint": str(resolve_checkpoint(init).resolve()) if init else None,
                       "id": model_id[0], "source": model_id[1], "seed": cfg.train.seed}}


def adapter_selector(meta: dict[str, Any]) -> Any:
    """Which entries of a LoRA checkpoint are its own (the base is elsewhere): the adapters, and a reward
    model's head."""
    head = ("output_layer.",) if meta.get("task") == "rm" else ()
    return lambda key: lora.is_adapter_key(key) or (bool(head) and key.startswith(head))


def _load_base(chunks: Any, path: Any, meta: dict[str, Any], arch: ModelArch, task: str,
               skip_prefixes: tuple[str, ...]) -> None:
    """The base model of the LoRA checkpoint ``path``, checked against the content it was trained on."""
    base = meta[BASE_KEY]
    if base.get("checkpoint") is None:
        init_random_weights(chunks, arch, int(base["seed"]))
        return
    source = Path(base["checkpoint"])
    if not source.is_dir():
        raise FileNotFoundError(f"LoRA checkpoint {path}: its base model {source} is not there (the adapters "
                                "need the weights they were trained on)")
    if (now := checkpoint_content_id(source)) != base["id"]:
        raise ValueError(f"LoRA checkpoint {path}: its base model {source} holds other weights than the adapters "
                         f"were trained on (content {base['id'][:12]} then, {now[:12]} now)")
    # a reward model's base may be a policy: its vocab head is not the scalar head (init_skip_prefixes)
    load_weights(chunks, source, arch, task, skip_prefixes=skip_prefixes + init_skip_prefixes(str(source), task))


@torch.no_grad()
def load_weights(chunks: Any, path: Any, arch: ModelArch, task: str = "policy", *,
                 skip_prefixes: tuple[str, ...] = ()) -> None:
    """Load a model or training checkpoint into this rank's chunks, at any layout. A LoRA checkpoint is its
    base model (a checkpoint, itself possibly LoRA, or the random init it records) with its adapters merged
    in; adapters the chunks have of their own (this run's) stay as they are."""
    path = resolve_checkpoint(path)
    meta = read_checkpoint_meta(path)
    if PEFT_KEY not in meta:  # the whole model; the chunks' own adapters (this run's) are not in it
        load_model_checkpoint(chunks, path, skip_prefixes=skip_prefixes, select=_not_adapter)
        return
    _load_base(chunks, path, meta, arch, task, skip_prefixes)
    spec = lora.LoraSpec.from_dict(meta[PEFT_KEY])
    keep = adapter_selector(meta)
    with lora.stashed_adapters(chunks):
        for chunk in as_chunks(chunks):
            lora.apply_lora(chunk, spec)
        load_model_checkpoint(chunks, path, select=lambda k: keep(k) and not k.startswith(skip_prefixes))
        lora.merge_lora(chunks)


def _not_adapter(key: str) -> bool:
    return not lora.is_adapter_key(key)


def load_adapters(chunks: Any, path: Any) -> dict[str, Any]:
    """Read a LoRA checkpoint's own entries (adapters, a reward head) into chunks that carry its adapters
    (built with its ``peft`` spec); returns its metadata. The base weights are left as they are."""
    path = resolve_checkpoint(path)
    meta = read_checkpoint_meta(path)
    if PEFT_KEY not in meta:
        raise ValueError(f"{path} is not a LoRA checkpoint (its {path.name}/rao_model.json records no adapters)")
    load_model_checkpoint(chunks, path, select=adapter_selector(meta))
    return meta


def build_initial_model(cfg: Config, arch: ModelArch, task: str) -> list[torch.nn.Module]:
    """This rank's model chunks for ``task``, initialised from ``model.init_checkpoint`` or at random; with
    ``peft.method=lora``, LoRA adapters on it (fresh: B = 0) and only they train."""
    check_model_layout(cfg, arch, task)
    chunks = build_model_chunks(arch, task=task, params_dtype=params_dtype(cfg),
                                sequence_parallel=cfg.parallel.sequence_parallel,
                                distributed_optimizer=cfg.parallel.distributed_optimizer,
                                lora=lora_spec(cfg), lora_seed=cfg.train.seed)
    if cfg.model.init_checkpoint:
        load_weights(chunks, cfg.model.init_checkpoint, arch, task,
                     skip_prefixes=init_skip_prefixes(cfg.model.init_checkpoint, task))
    else:
        init_random_weights(chunks, arch, cfg.train.seed)
    coeff = moe_aux_loss_coeff(cfg, arch)
    if coeff is not None:
        set_moe_aux_loss_coeff(chunks, coeff)
    return chunks
