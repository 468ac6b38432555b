"""Shared run set-up for the command-line tools: process groups, tokenizer, architecture, data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rao_megatron.config import Config, ConfigError
from rao_megatron.parallel.launch import free_port

PRESET_FAMILIES = {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0, device: str = "auto") -> None:
    """Join torchrun's process group (env RANK, WORLD_SIZE, ...), or start a 1-rank one for ``python -m``.

    ``device`` (``parallel.device``) is checked against the machine first (:func:`check_device`).
    """
    check_device(device)
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def check_device(device: str = "auto") -> None:
    """``parallel.device`` as the machine allows: cuda needs a CUDA torch that sees a GPU, and CUDA needs TE.

    A GPU job must never fall back to training on the CPU: a CPU-only wheel in the job's venv (``make``
    on a login node without GPUs installs one) or a node without visible GPUs stops here, naming the
    interpreter. On CUDA the Transformer Engine spec is required (the local spec's torch norms are not
    built for CUDA / bf16 by Megatron; a silent fallback would fail at the first forward).
    """
    import importlib.util
    import sys

    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        if torch.version.cuda is None:
            why = f"torch {torch.__version__}, a CPU-only build"
        else:
            why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) but no visible GPU "
                   f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})")
        raise ConfigError(f"config key 'parallel.device' is cuda, but {sys.executable} has {why}; install the CUDA "
                          "build of torch in this environment, run on a GPU node, or set parallel.device=cpu")
    if device == "cpu" and cuda:
        raise ConfigError("config key 'parallel.device' is cpu, but this process sees CUDA devices; hide them "
                          "with CUDA_VISIBLE_DEVICES= (the sbatch scripts do with DEVICE=cpu)")
    if cuda and importlib.util.find_spec("transformer_engine") is None:
        raise ConfigError(f"CUDA run without Transformer Engine: {sys.executable} cannot import transformer_engine; "
                          "install it (pip install -e '.[gpu]', or use an NGC PyTorch container)")


def check_layout(cfg: Config) -> None:
    """World size must be a multiple of TP × PP: say so before Megatron does, in the config's words."""
    world = dist.get_world_size()
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world % (tp * pp):
        raise ConfigError(f"world size {world} is not divisible by parallel.tp × parallel.pp = {tp} × {pp}; "
                          f"launch a multiple of {tp * pp} processes (torchrun --nproc-per-node)")


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log0(*args: Any) -> None:
    """Print on global rank 0 only."""
    if is_rank0():
        print(*args, flush=True)


def model_dir(cfg: Config) -> str | None:
    """The HF model directory of this run, if any (architecture and default tokenizer)."""
    if cfg.model.hf_config is None:
        return None
    p = Path(cfg.model.hf_config)
    return str(p.parent if p.name == "config.json" else p)


def checkpoint_tokenizer(checkpoint: str | os.PathLike) -> str | None:
    """The tokenizer directory a model checkpoint records, else the copy inside it, else None (tiny tokenizer)."""
    from rao_megatron.training.checkpoint import read_checkpoint_meta, resolve_checkpoint

    path = read_checkpoint_meta(checkpoint).get("tokenizer")
    inside = resolve_checkpoint(checkpoint) / "tokenizer"
    if (path is None or not Path(path).is_dir()) and inside.is_dir():
        path = str(inside)  # the converter copies the tokenizer into the checkpoint: survives a move
    return path


def run_tokenizer_path(cfg: Config) -> str | None:
    """``model.tokenizer``, else the HF model directory, else the initial checkpoint's; None: the tiny tokenizer."""
    path = cfg.model.tokenizer or model_dir(cfg)
    if path is None and cfg.model.init_checkpoint:
        path = checkpoint_tokenizer(cfg.model.init_checkpoint)
    return str(Path(path).resolve()) if path is not None else None


def load_run_tokenizer(cfg: Config) -> Any:
    """The run's tokenizer (see :func:`run_tokenizer_path`)."""
    from rao_megatron.data.tokenizer import load_tokenizer

    return load_tokenizer(run_tokenizer_path(cfg))


def resolve_hf_config(cfg: Config, tokenizer: Any) -> Any:
    """The HF config the Megatron model is built from (checkpoint metadata, HF directory, or tiny preset)."""
    from transformers import AutoConfig

    from rao_megatron.models.hf_config import tiny_hf_config

    if cfg.model.init_checkpoint:
        from rao_megatron.training.checkpoint import read_checkpoint_meta

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


def params_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32


@dataclass
class RunGroups:
    """Tokenized groups of a run: training, held-out, and which file each came from (for the cache)."""

    train: list[Any]
    heldout: list[Any]
    report: Any
    heldout_report: Any | None
    t0: int | None


def _tokenized(path: str, cfg: Config, tokenizer: Any, spec: Any, t0: int | None) -> tuple[list[Any], Any]:
    from rao_megatron.data import read_examples, tokenize_examples

    examples = read_examples(path, reward_field=cfg.data.ultrafeedback_rating)
    return tokenize_examples(
        examples, tokenizer, max_length=cfg.data.max_length, overlength=cfg.data.overlength,
        max_responses=cfg.data.max_responses, min_responses=2 if spec.pairwise else 1,
        drop_tied=spec.pairwise, t0=t0, source=path)


def load_groups(cfg: Config, tokenizer: Any, spec: Any) -> RunGroups:
    """Read, validate and tokenize the training data (and held-out data); report what was dropped."""
    from rao_megatron.data import split_heldout

    if not cfg.data.train_path:
        raise ConfigError("config key 'data.train_path' is not set: give a JSONL/Parquet file or a dataset")
    groups, report = _tokenized(cfg.data.train_path, cfg, tokenizer, spec, None)
    if not groups:
        raise ConfigError(f"no usable groups in {cfg.data.train_path}: "
                          + "; ".join(line.strip() for line in report.summary().splitlines()))
    if spec.needs_rewards and groups[0].rewards is None:
        raise ConfigError(f"loss '{spec.name}' needs rewards, but {cfg.data.train_path} has none "
                          "(annotate it: python -m rao_megatron.annotate)")
    t0 = report.t0
    if cfg.data.eval_path:
        heldout, heldout_report = _tokenized(cfg.data.eval_path, cfg, tokenizer, spec, t0)
        return RunGroups(groups, heldout, report, heldout_report, t0)
    train, heldout = split_heldout(groups, cfg.data.eval_fraction, cfg.data.seed)
    return RunGroups(train, heldout, report, None, t0)


def reference_fingerprints(cfg: Config, tokenizer: Any, data_path: str) -> dict[str, str]:
    """What a reference cache must agree with: data, tokenizer, length policy and the reference model."""
    from rao_megatron.training.reference_cache import cache_fingerprints

    fp = cache_fingerprints(data_path=data_path, tokenizer=tokenizer, max_length=cfg.data.max_length,
                            overlength=cfg.data.overlength)
    if cfg.model.init_checkpoint:
        fp["model"] = f"checkpoint:{Path(cfg.model.init_checkpoint).resolve()}"
    else:
        fp["model"] = f"random:{cfg.model.hf_config or cfg.model.preset}:seed={cfg.train.seed}"
    return fp


def reference_cache_path(cfg: Config, data_path: str, *, heldout: bool = False) -> Path:
    """``data.reference_cache`` (training file) or the default path beside the data file."""
    from rao_megatron.training.reference_cache import default_cache_path

    if cfg.data.reference_cache and not heldout:
        return Path(cfg.data.reference_cache)
    return default_cache_path(data_path)


@torch.no_grad()
def init_random_weights(chunks: Any, hf_config: Any, seed: int) -> None:
    """Random init that does not depend on the TP/PP layout: an HF model seeded on CPU, mapped in.

    Megatron's own init draws a different stream per TP rank, so a tiny run at TP1 and TP2 would start
    from different weights; going through the HF layout makes every layout start identically.
    """
    from transformers import AutoModelForCausalLM

    from rao_megatron.conversion.state import load_hf_state_dict_into_megatron

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        load_hf_state_dict_into_megatron(chunks, model.state_dict(), hf_config)
    finally:
        torch.random.set_rng_state(state)


def init_skip_prefixes(init_checkpoint: str, task: str) -> tuple[str, ...]:
    """What not to load from ``init_checkpoint`` into a ``task`` model: a policy's vocab head into a reward model.

    A policy checkpoint's ``output_layer`` is the ``[V, H]`` vocab projection (or absent, when tied to
    the embedding); the reward model's is a ``[1, H]`` scalar head. Read as is, dist_checkpointing would
    copy vocab row 0 into the head, so the head keeps its fresh initialisation instead. A reward-model
    checkpoint (``task: rm``) loads whole, head included.
    """
    from rao_megatron.training.checkpoint import read_checkpoint_meta

    source = read_checkpoint_meta(init_checkpoint).get("task", "policy")
    if task == "rm" and source != "rm":
        log0(f"reward model from the '{source}' checkpoint {init_checkpoint}: transformer weights loaded, "
             "its vocab output layer dropped, scalar head freshly initialised")
        return ("output_layer.",)
    if task != "rm" and source == "rm":
        raise ConfigError(f"config key 'model.init_checkpoint': {init_checkpoint} is a reward model "
                          f"(task rm); a {task} model needs a policy checkpoint")
    return ()


def build_initial_model(cfg: Config, hf_config: Any, task: str) -> list[torch.nn.Module]:
    """This rank's model chunks for ``task``, initialised from ``model.init_checkpoint`` or at random."""
    from rao_megatron.training.checkpoint import load_model_checkpoint
    from rao_megatron.training.engine import build_model_chunks

    chunks = build_model_chunks(hf_config, task=task, params_dtype=params_dtype(cfg),
                                sequence_parallel=cfg.parallel.sequence_parallel,
                                distributed_optimizer=cfg.parallel.distributed_optimizer)
    if cfg.model.init_checkpoint:
        load_model_checkpoint(chunks, cfg.model.init_checkpoint,
                              skip_prefixes=init_skip_prefixes(cfg.model.init_checkpoint, task))
    else:
        init_random_weights(chunks, hf_config, cfg.train.seed)
    return chunks


def start(cfg: Config) -> None:
    """Process groups and Megatron's TP/PP/DP layout for this run."""
    from rao_megatron.parallel.state import initialize_model_parallel

    init_distributed(cfg.parallel.backend, device=cfg.parallel.device)
    check_layout(cfg)
    initialize_model_parallel(tp=cfg.parallel.tp, pp=cfg.parallel.pp, vpp=cfg.parallel.vpp, seed=cfg.train.seed)
