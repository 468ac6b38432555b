"""Command-line plumbing shared by the tools: one-line errors for user mistakes, tracebacks with --debug."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable

# Megatron-Core announces each CPU fallback (no Transformer Engine / apex) at import; on a CPU box that
# is the expected set-up, and the dozen lines bury the tool's own output.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex|apex).*(not installed|Falling back)")
warnings.filterwarnings("ignore", message=r".*custom_layers.transformer_engine.*deprecated")
warnings.filterwarnings("ignore", message=r"full scope is deprecated")
# torch.distributed.checkpoint's own deprecations, raised inside Megatron's checkpoint loader on every load
warnings.filterwarnings("ignore", message=r"Please use DTensor instead and we are deprecating ShardedTensor")
warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated and will be removed")

#: exit code for a user error (bad config, data, checkpoint or arguments)
EXIT_USER_ERROR = 2
#: training stopped after too many non-finite steps in a row
EXIT_NON_FINITE = 3
#: preempted (SIGTERM/SIGUSR1): a checkpoint was saved; the sbatch scripts requeue the job on this code
EXIT_PREEMPTED = 75


def user_error_types() -> tuple[type[BaseException], ...]:
    from rao_megatron.config import ConfigError
    from rao_megatron.training.reference_cache import ReferenceCacheError

    types: list[type[BaseException]] = [ConfigError, ReferenceCacheError, FileNotFoundError, ValueError, KeyError]
    try:
        from rao_megatron.data.errors import DataError

        types.insert(0, DataError)
    except ImportError:  # pragma: no cover - the data package is always present in a full install
        pass
    return tuple(types)


def run_cli(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
            argv: list[str] | None = None) -> int:
    """Parse ``argv``, run ``main``; a user error prints ``error: …`` on one line and exits with code 2."""
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    args = parser.parse_args(argv)
    try:
        return int(main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except user_error_types() as e:
        if args.debug:
            raise
        rank = os.environ.get("RANK", "0")
        if rank == "0" or not isinstance(e, user_error_types()[:2]):
            prefix = "" if rank == "0" else f"[rank {rank}] "
            msg = str(e) if not isinstance(e, KeyError) else str(e.args[0] if e.args else e)
            print(f"{prefix}error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return EXIT_USER_ERROR
