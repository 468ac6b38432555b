"""Train a policy (RAO or a baseline loss), a reward model, or SFT from one YAML config.

    torchrun --nproc-per-node 2 -m rao_megatron.cli.train --config examples/configs/rao_tiny.yaml parallel.tp=2
"""

from __future__ import annotations

import argparse
import sys

from rao_megatron.cli.common import EXIT_NON_FINITE, EXIT_PREEMPTED, path_option, run_cli
from rao_megatron.config import describe, load_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rao_megatron.cli.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    path_option(p, "--config", required=False, help="YAML config (see examples/configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. loss.beta=0.1 train.lr=5e-7")
    p.add_argument("--help-config", action="store_true", help="list every config key with its help and exit")
    return p


def main(args: argparse.Namespace) -> int:
    if args.help_config:
        print(describe())
        return 0
    cfg = load_config(args.config, args.overrides)
    from rao_megatron.training.loop import Trainer  # heavy: megatron; --help and config errors load none
    from rao_megatron.training.reliability import NonFiniteError, Preempted

    try:
        Trainer(cfg).run()
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return EXIT_PREEMPTED
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The ``rao-*`` entry point."""
    return run_cli(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
