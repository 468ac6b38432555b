"""Check ``preemption``: SIGUSR1 through torchrun on GPU saves a checkpoint and stops the run; the resumed run's next
losses equal an uninterrupted run's."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from ..harness import (
    FAIL,
    PASS,
    RAO_TINY,
    Check,
    Context,
    Row,
    Running,
    base_env,
    last_error,
    read_metrics,
    torchrun_cmd,
    train_args,
)
from ..judge import compare_losses, finite, first_problem, rel_diff

#: repeatable GPU runs for the preemption comparison (Transformer Engine attention, cuBLAS)
DETERMINISTIC_ENV = {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
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


CHECK = Check("preemption", "SIGUSR1 through torchrun saves a checkpoint and stops; the resumed run's next losses "
              "equal an uninterrupted run's", check_preemption, 200, ("transformer_engine",))
