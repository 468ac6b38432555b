"""Command-line plumbing shared by the tools: one-line errors for user mistakes, tracebacks with --debug."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from rao_megatron.config import ConfigError, expand_path, same_path

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


#: seconds a rank other than 0 waits for rank 0 to print the same user error before printing its own
ERROR_WAIT_S = 20.0
_PRINTED_KEY = "rao_megatron/user_error_printed"


def user_error_types() -> tuple[type[BaseException], ...]:
    from rao_megatron.training.reference_cache import (
        ReferenceCacheError,  # heavy: torch; every command imports this module before parsing
    )

    types: list[type[BaseException]] = [ConfigError, ReferenceCacheError, FileNotFoundError, ValueError, KeyError]
    try:
        from rao_megatron.data.errors import DataError  # heavy: torch, transformers (the data package)

        types.insert(0, DataError)
    except ImportError:  # pragma: no cover - the data package is always present in a full install
        pass
    return tuple(types)


def _error_store() -> Any:
    """A key-value store every rank of this job reaches: the process group's, else torchrun's agent store."""
    import torch.distributed as dist  # heavy: torch; every command imports this module before parsing

    try:
        if dist.is_initialized():
            return dist.distributed_c10d._get_default_store()
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_PORT" in os.environ:
            return dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]),
                                 is_master=False, timeout=timedelta(seconds=ERROR_WAIT_S))
    except Exception:  # noqa: BLE001 - no store: each rank prints its own line
        return None
    return None


def report_user_error(message: str) -> None:
    """Print ``error: message`` once per job: rank 0 prints; another rank prints only if rank 0 did not.

    A user error (config, data, paths, layout) is found by every rank at the same check, so rank 0's
    line is the job's. Through the job's store every rank says it has reached the error, rank 0 says it
    has printed and, once all have reached it, releases them (each wait at most :data:`ERROR_WAIT_S`
    seconds). A rank other than 0 prints its own line, prefixed ``[rank N]``, only if rank 0's mark does
    not come: an error that only some ranks hit is never lost. Under torchrun, which stops the remaining
    workers with SIGTERM as soon as one exits, a rank that is leaving with a user error ignores SIGTERM,
    so that every rank exits 2 (a slow rank killed on its way out would show as -15).
    """
    rank = os.environ.get("RANK", "0")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # leaving anyway, with exit code 2
    store = _error_store() if world > 1 else None
    wait = timedelta(seconds=ERROR_WAIT_S)
    try:
        if store is not None:
            store.set(f"{_PRINTED_KEY}/reached/{rank}", "1")
    except Exception:  # noqa: BLE001 - without the store every rank prints its own line
        store = None
    if rank == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
        if store is not None:
            try:
                store.set(_PRINTED_KEY, "1")
                store.wait([f"{_PRINTED_KEY}/reached/{r}" for r in range(1, world)], wait)
                store.set(f"{_PRINTED_KEY}/release", "1")
            except Exception:  # noqa: BLE001 - a rank that did not reach it: torchrun stops it
                pass
        return
    if store is not None:
        try:
            store.wait([_PRINTED_KEY], wait)
        except Exception:  # noqa: BLE001 - timeout or store gone: rank 0 did not report it
            store = None
    if store is None:
        print(f"[rank {rank}] error: {message}", file=sys.stderr, flush=True)
        return
    try:
        store.wait([f"{_PRINTED_KEY}/release"], wait)
    except Exception:  # noqa: BLE001 - leave anyway
        pass


#: what a path option is to its command: read, written, or neither (run_cli expands every one of them)
PATH_ROLES = ("input", "output", "path")


def path_option(parser: Any, *flags: str, role: str = "input", **kwargs: Any) -> argparse.Action:
    """``parser.add_argument`` for an option naming a file or directory.

    :func:`run_cli` expands ``~`` and ``$VARIABLES`` in it (``config.expand_path``, the rule of the config's
    path keys too) and refuses an ``output`` option that names the same path as an ``input`` option of the
    command: no command writes over its input.
    """
    if role not in PATH_ROLES:
        raise ValueError(f"role must be one of {PATH_ROLES}, got {role!r}")
    action = parser.add_argument(*flags, **kwargs)
    action.path_role = role  # type: ignore[attr-defined]
    return action


def _path_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The path options of ``parser`` and of its sub-commands."""
    found = []
    for action in parser._actions:
        if getattr(action, "path_role", None):
            found.append(action)
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += _path_actions(sub)
    return found


def _option_name(action: argparse.Action) -> str:
    return max(action.option_strings, key=len) if action.option_strings else action.dest


def refuse_overwrite(outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
    """Raise a one-line error when a path an output option writes is one an input option reads.

    ``outputs`` / ``inputs``: option name -> a path or a list of paths (None: not given).
    """
    def paths(value: Any) -> list[str]:
        if value is None:
            return []
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]

    for out_name, out_value in outputs.items():
        for out in paths(out_value):
            for in_name, in_value in inputs.items():
                for source in paths(in_value):
                    if same_path(out, source):
                        raise ConfigError(f"{out_name} {out} is the same path as {in_name} {source}: a command "
                                          f"never writes over its input; choose another {out_name}")


def prepare_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Expand ``~`` / ``$VARIABLES`` in every path option of ``args`` and refuse outputs over inputs."""
    roles: dict[str, dict[str, Any]] = {"input": {}, "output": {}}
    done: set[str] = set()
    for action in _path_actions(parser):  # sub-commands may share a dest (--out): each value once
        value = getattr(args, action.dest, None)
        if value is None or action.dest in done:
            continue
        done.add(action.dest)
        name = _option_name(action)
        try:
            if isinstance(value, list):
                value = [expand_path(v) if isinstance(v, str) else v for v in value]
            elif isinstance(value, str):
                value = expand_path(value)
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None
        setattr(args, action.dest, value)
        if action.path_role in roles:
            roles[action.path_role][name] = value
    refuse_overwrite(roles["output"], roles["input"])


def run_cli(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
            argv: list[str] | None = None) -> int:
    """Parse ``argv``, run ``main``; a user error prints ``error: …`` on one line and exits with code 2.

    Under torchrun every rank exits 2 and the line is printed once (:func:`report_user_error`); torchrun
    then adds its own ``ChildFailedError`` report (each rank's exit code) and exits 1 itself: the first
    ``error:`` line is the cause.
    """
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    args = parser.parse_args(argv)
    try:
        prepare_paths(parser, args)
        return int(main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except user_error_types() as e:
        if args.debug:
            raise
        if isinstance(e, OSError) and e.errno is not None:
            msg = os_error_line(e)
        else:
            msg = str(e) if not isinstance(e, KeyError) else str(e.args[0] if e.args else e)
        report_user_error(msg.splitlines()[0] if msg.strip() else type(e).__name__)
        return EXIT_USER_ERROR
    except OSError as e:
        # the user's paths: permissions, a directory where a file belongs, a full disk; not the network
        if args.debug or isinstance(e, (ConnectionError, TimeoutError)) or e.errno is None:
            raise
        report_user_error(os_error_line(e))
        return EXIT_USER_ERROR


def os_error_line(e: OSError) -> str:
    """``PATH: No space left on device`` (``[Errno 28] ...: 'PATH'`` as Python spells it, made readable)."""
    if e.filename is None:
        return e.strerror or str(e)
    target = f" -> {e.filename2}" if e.filename2 is not None else ""
    return f"{e.filename}{target}: {e.strerror or type(e).__name__}"
