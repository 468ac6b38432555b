"""``python -m rao_megatron.cli.convert``: HF <-> Megatron checkpoint conversion and logit comparison, on CPU.

    hf-to-megatron --hf DIR --out DIR [--tp N] [--pp M] [--ep E] [--etp T] [--dtype auto|fp32|bf16] [--task policy|rm]
    megatron-to-hf --megatron DIR --out DIR [--dtype auto|fp32|bf16] [--max-shard-size 2GB] [--merge-lora]
    compare        --hf DIR --megatron DIR [--tp N] [--pp M] [--ep E] [--etp T] [--prompts P ...] [--atol 1e-3]

A LoRA checkpoint (``peft.method=lora``) exports as an HF PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, for ``peft.PeftModel.from_pretrained(base, DIR)``; written without the peft
library), or with ``--merge-lora`` as the full model, adapters merged into its base.

Run it as a plain process: it starts the tp x pp (x dp for --ep) CPU (gloo) processes itself. GPUs are hidden.
Heavy imports happen inside ``main``: dist_checkpointing spawns a helper process that re-imports this
module, which should stay cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rao_megatron.cli.common import (
    path_option,  # light: no torch
    run_cli,
)


def parser() -> argparse.ArgumentParser:
    """The argument parser of all three sub-commands."""
    parser = argparse.ArgumentParser(prog="python -m rao_megatron.cli.convert", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dtype_help = "parameter dtype; auto = the source's (HF config dtype / checkpoint's stored dtype)"

    h2m = sub.add_parser("hf-to-megatron", help="HF safetensors directory -> Megatron torch_dist checkpoint")
    path_option(h2m, "--hf", required=True, help="HF model directory (config.json, *.safetensors, tokenizer)")
    path_option(h2m, "--out", role="output", required=True, help="new (or empty) output directory")
    h2m.add_argument("--tp", type=int, default=1, help="tensor-parallel size the ranks are written at")
    h2m.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the ranks are written at")
    _expert_args(h2m, "written at")
    h2m.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help=dtype_help)
    h2m.add_argument("--task", default=None, choices=("policy", "rm"),
                     help="policy (causal LM) or rm (scalar head); default: rm for *ForSequenceClassification")

    m2h = sub.add_parser("megatron-to-hf", help="Megatron checkpoint (any TP/PP) -> HF safetensors directory")
    path_option(m2h, "--megatron", required=True, help="Megatron model checkpoint directory (rao_model.json)")
    path_option(m2h, "--out", role="output", required=True, help="new (or empty) output directory")
    m2h.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help=dtype_help)
    m2h.add_argument("--max-shard-size", default="2GB",
                     help="largest safetensors file (e.g. 2GB, 500MB); above it the weights are sharded with "
                          "model.safetensors.index.json")
    m2h.add_argument("--merge-lora", action="store_true",
                     help="a LoRA checkpoint: write the full model with the adapters merged into its base (default: "
                          "an HF PEFT adapter folder); other checkpoints export as they are")

    cmp = sub.add_parser("compare", help="logits of an HF model vs a Megatron checkpoint (fp32, same prompts)")
    path_option(cmp, "--hf", required=True, help="HF model directory")
    path_option(cmp, "--megatron", required=True, help="Megatron model checkpoint directory")
    cmp.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load the checkpoint at")
    cmp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load the checkpoint at")
    _expert_args(cmp, "loaded at")
    cmp.add_argument("--prompts", nargs="+", default=None,
                     help="user messages, chat-templated with the model's tokenizer (default: a few fixed ones)")
    cmp.add_argument("--atol", type=float, default=1e-3, help="largest allowed max |logits difference|")

    for p in (h2m, m2h):
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _expert_args(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--ep", type=int, default=1, help=f"expert-parallel size the checkpoint is {verb} (MoE models)")
    p.add_argument("--etp", type=int, default=None,
                   help=f"expert tensor-parallel size the checkpoint is {verb} (MoE; default: --tp)")


def main(args: argparse.Namespace) -> int:
    """Run one sub-command; returns the exit code (compare: 1 past tolerance)."""
    if args.command == "hf-to-megatron":
        from rao_megatron.conversion.convert import hf_to_megatron  # heavy: megatron; --help loads none

        out = hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, dtype=args.dtype,
                             task=args.task, progress=not args.no_progress)
        experts = f" EP{args.ep}" if args.ep > 1 else ""
        print(f"wrote Megatron checkpoint {out} (written at TP{args.tp} PP{args.pp}{experts}; loads at any layout)")
        return 0
    if args.command == "megatron-to-hf":
        from rao_megatron.conversion.convert import ADAPTER_CONFIG, megatron_to_hf  # heavy: megatron

        out = megatron_to_hf(args.megatron, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                             merge_lora=args.merge_lora, progress=not args.no_progress)
        if (out / ADAPTER_CONFIG).is_file():
            base = json.loads((out / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
            print(f"wrote HF PEFT adapter {out}" + (f" (base model {base})" if base else ""))
        else:
            print(f"wrote HF model {out}")
        return 0
    from rao_megatron.conversion.compare import compare_checkpoints  # heavy: megatron; --help loads none

    result = compare_checkpoints(args.hf, args.megatron, tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp,
                                 prompts=args.prompts)
    print(result.report(args.atol))
    return 0 if result.within(args.atol) else 1


def cli(argv: list[str] | None = None) -> int:
    """Entry point: one-line ``error: ...`` and exit code 2 for user errors (see ``rao_megatron.cli.common``)."""
    if "torch" not in sys.modules:
        # Conversion is CPU work over gloo: hidden GPUs keep every rank's tensors on the CPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

    return run_cli(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
