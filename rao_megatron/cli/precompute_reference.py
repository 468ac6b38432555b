"""Precompute the reference model's log-probs once, so training holds only the policy.

    torchrun --nproc-per-node 2 -m rao_megatron.cli.precompute_reference --config examples/configs/rao_tiny.yaml

Uses the training config: the same data, tokenizer, length policy and initial model (the reference is
the initial policy, ``model.init_checkpoint``). Forward only, at any TP/PP/DP. Writes P_ref(x) and
R_ref(y) per sequence beside the data (``<data>.ref_logps.safetensors``, or ``data.reference_cache``),
keyed by a hash of the tokenized sequence; training finds and checks it (``train.reference=auto``).
"""

from __future__ import annotations

import argparse
import sys
import time

from rao_megatron.cli.common import run_cli

BLOCK = 8  # micro-batches per pipeline schedule call: amortises the pipeline bubble


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rao_megatron.cli.precompute_reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the training YAML config")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (as for training)")
    return p


def compute_file_cache(cfg, tokenizer, chunks, hf_config, groups, data_path: str, out_path, *,
                       identity: tuple[dict[str, str], dict[str, str]]) -> int:
    """Forward-only pass over ``groups``; rank 0 writes the cache for ``data_path`` with ``identity``
    (``run_data.reference_fingerprints``). Returns sequences written."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from rao_megatron.data import PAD_GROUP, GroupBatcher
    from rao_megatron.parallel import startup
    from rao_megatron.training import run_data
    from rao_megatron.training.engine import sequence_logps
    from rao_megatron.training.forward_step import LogprobSettings
    from rao_megatron.training.reference_cache import write_cache

    dp, gpm = ps.get_data_parallel_world_size(), cfg.data.groups_per_micro_batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batcher = GroupBatcher(groups, seq_length=cfg.data.max_length, pad_id=pad, groups_per_micro_batch=gpm,
                           global_batch_groups=dp * gpm, dp_rank=ps.get_data_parallel_rank(), dp_size=dp,
                           seed=cfg.data.seed, **run_data.packing_settings(cfg))
    settings = LogprobSettings(impl=cfg.model.logprob_impl, precision=cfg.model.logprob_precision,
                               chunk_size=cfg.model.logprob_chunk_size)
    keep_results = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    keys: list[int] = []
    prompt: list[float] = []
    response: list[float] = []
    microbatches = list(batcher.iter_eval_microbatches())
    bar = tqdm(total=len(microbatches), disable=not startup.is_rank0(), desc=f"reference log-probs ({data_path})",
               dynamic_ncols=True)
    for start in range(0, len(microbatches), BLOCK):
        block = microbatches[start:start + BLOCK]
        sums = sequence_logps(chunks, block, vocab_size=hf_config.vocab_size, settings=settings)
        if keep_results:
            for mb, (p, r) in zip(block, sums):
                real = mb["group_ids"] != PAD_GROUP
                keys += mb["seq_keys"][real].tolist()
                prompt += p[real].tolist()
                response += r[real].tolist()
        bar.update(len(block))
    bar.close()
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (keys, prompt, response) if keep_results else None)
    count = 0
    if startup.is_rank0():
        all_keys, all_p, all_r = [], [], []
        for part in parts:
            if part is not None:
                all_keys += part[0]
                all_p += part[1]
                all_r += part[2]
        fingerprints, info = identity
        extra = {**info, "info_created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "info_layout": f"tp{cfg.parallel.tp}-pp{cfg.parallel.pp}-dp{dp}"}
        write_cache(out_path, all_keys, all_p, all_r, fingerprints, extra)
        count = len(set(all_keys))
    dist.barrier()
    return count


def main(args: argparse.Namespace) -> int:
    from rao_megatron.config import load_config
    from rao_megatron.parallel import startup
    from rao_megatron.training import model_init, preflight, run_data

    cfg = load_config(args.config, args.overrides)
    startup.start(cfg)
    spec = cfg.loss.build().spec
    if not spec.needs_reference:
        startup.log0(f"note: loss '{spec.name}' does not use reference log-probs; computing them anyway")
    tokenizer = run_data.load_run_tokenizer(cfg)
    hf_config = model_init.resolve_hf_config(cfg, tokenizer)
    preflight.check_model_fits(cfg, tokenizer, hf_config)
    groups = run_data.load_groups(cfg, tokenizer, spec)
    startup.log0(groups.report.summary())
    preflight.warn_about_data(groups)
    files = groups.files(cfg)  # the training file's cache also holds its held-out split
    outs = [run_data.reference_cache_path(cfg, path, heldout=i > 0) for i, (path, _) in enumerate(files)]
    preflight.check_cache_outputs(cfg, outs)  # before hours of forward passes, not after
    model = preflight.on_rank0(lambda: run_data.model_identity(cfg, hf_config))
    chunks = model_init.build_initial_model(cfg, hf_config, "reference")
    for (data_path, file_groups), out in zip(files, outs):
        identity = run_data.reference_fingerprints(cfg, tokenizer, model, file_groups)
        n = compute_file_cache(cfg, tokenizer, chunks, hf_config, file_groups, data_path, out, identity=identity)
        startup.log0(f"wrote {n} reference log-prob pairs to {out}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The ``rao-*`` entry point."""
    return run_cli(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
