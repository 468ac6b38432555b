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

from rao_megatron.cli.common import path_option, run_cli
from rao_megatron.config import load_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rao_megatron.cli.precompute_reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    path_option(p, "--config", required=True, help="the training YAML config")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (as for training)")
    return p


def main(args: argparse.Namespace) -> int:
    from rao_megatron.parallel import startup  # heavy: megatron; --help and config errors load none
    from rao_megatron.training import model_init, preflight, reference, run_data

    cfg = load_config(args.config, args.overrides)
    startup.start(cfg.parallel, seed=cfg.train.seed)
    startup.check_packing_dtype(cfg.data.packing, cfg.model.dtype)
    spec = cfg.loss.build().spec
    if not spec.needs_reference:
        startup.log0(f"note: loss '{spec.name}' does not use reference log-probs; computing them anyway")
    tokenizer = run_data.load_run_tokenizer(cfg)
    arch = model_init.resolve_arch(cfg, tokenizer)
    preflight.check_model_fits(cfg, tokenizer, arch)
    groups = run_data.load_groups(cfg, tokenizer, spec)
    startup.log0(groups.report.summary())
    preflight.warn_about_data(groups)
    files = groups.files(cfg)  # the training file's cache also holds its held-out split
    outs = [reference.reference_cache_path(cfg, path, heldout=i > 0) for i, (path, _) in enumerate(files)]
    preflight.check_cache_outputs(cfg, outs)  # before hours of forward passes, not after
    model = preflight.on_rank0(lambda: reference.model_identity(cfg, arch))
    chunks = model_init.build_initial_model(cfg, arch, "reference")
    for (data_path, file_groups), out in zip(files, outs):
        identity = reference.reference_fingerprints(cfg, tokenizer, model, file_groups)
        n = reference.compute_file_cache(cfg, tokenizer, chunks, arch, file_groups, data_path, out,
                                         identity=identity)
        startup.log0(f"wrote {n} reference log-prob pairs to {out}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The ``rao-*`` entry point."""
    return run_cli(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
