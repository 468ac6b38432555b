"""LoRA against full fine-tuning on SmolLM2-135M-Instruct: trainable parameters, optimizer state, peak RSS and
step time of one RAO training setup, three arms side by side in one run.

    python benchmarks/lora.py --quick     # 1 run per arm, 1 warm-up + 1 timed step of 2 groups: a smoke test
    python benchmarks/lora.py             # 2 runs per arm, 1 warm-up + 3 timed steps of 8 groups: ~14 min, 2 cores

The arms (RAO, β 0.1, log_z0 from the data, fp32, TP1 PP1: one process, 1-rank gloo, two torch threads):

- ``full``: every weight trains, the reference log-probs come from a cache (``train.reference=cached``);
- ``lora_cached``: LoRA r = 16, alpha 32 on every linear (``peft.method=lora``), the same cache;
- ``lora_adapters_off``: the same LoRA, the reference from the model itself with its adapters switched off
  (``train.reference=adapters_off``, what ``auto`` means under LoRA): one extra forward pass per step, no cache.

The step is the quick-start's: 8 groups (arithmetic prompts of ``rao_megatron/tasks/arithmetic.py``, 4 answers
each) per optimizer step in micro-batches of 2 groups, ``max_length`` 64, packed. The answers are written by
code (the right number, a wrong one, each bare and in a sentence; reward 1 if right), not sampled: the step
costs the same, and the benchmark needs no generation. The reference cache is computed once, before any timing.

Every (arm, repeat) runs in a fresh subprocess (``--worker``) that builds the ``Trainer`` and runs its steps; it
reports what it measured itself: the trainable parameters (``requires_grad``), the optimizer state (every
tensor in the Megatron optimizer's Adam state, plus its fp32 master copies when the parameters are bf16; none in
fp32), the DDP gradient buffers, its peak RSS (``ru_maxrss``) after the ``Trainer`` was built and at the end,
``step_time_s`` (wall) and the process's CPU seconds (``time.process_time``, all its threads) of each timed step,
and the machine's 1-minute load average at its end. Other jobs on the same cores show in the load average and
inflate the wall times; the CPU seconds move much less with them, and the memory figures not at all. The arms
rotate their order from repeat to repeat to spread machine noise; the table gives the median over runs of each
run's median step, with the min-max over runs, and the ratios full / LoRA are taken within a repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the `benchmarks` package (and rao_megatron) import from the root

# torch and the trainer are imported in the worker only: the parent process stays light
from benchmarks.common import print_result, run_result_worker, spread  # noqa: E402
from benchmarks.packing import SMOLLM2_MEGATRON, ensure_smollm2  # noqa: E402
from rao_megatron.cli.chain import python_module, run_command  # noqa: E402
from rao_megatron.rewards.synthetic import write_jsonl  # noqa: E402
from rao_megatron.tasks.arithmetic import split  # noqa: E402

CONFIG = ROOT / "examples/configs/rao_smollm2_demo.yaml"
LORA = ["peft.method=lora", "peft.rank=16", "peft.alpha=32"]
#: arm -> (what, config overrides)
ARMS: dict[str, tuple[str, list[str]]] = {
    "full": ("full fine-tuning, reference cached", ["peft.method=none", "train.reference=cached"]),
    "lora_cached": ("LoRA r=16, reference cached", [*LORA, "train.reference=cached"]),
    "lora_adapters_off": ("LoRA r=16, reference = adapters off", [*LORA, "train.reference=adapters_off"]),
}


def arithmetic_groups(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The first ``n`` of the quick-start's 105 train prompts (all when fewer), each with 4 answers written by code:
    the right number and a wrong one, bare and in a sentence (the lengths of SmolLM2's sampled answers), reward 1
    for the right ones. As many groups as the run's steps draw: the reference cache covers no more than it needs."""
    train, _ = split(40, seed=seed)
    rows = []
    for r in train[:n]:
        right, wrong = r["answer"], r["answer"] + 1 + (r["answer"] % 3)
        rows.append({"id": r["id"], "prompt": r["prompt"],
                     "responses": [str(right), f"The answer is {wrong}.", f"The answer is {right}.", str(wrong)],
                     "rewards": [1.0, 0.0, 1.0, 0.0]})
    return rows


def _nbytes(tensors: Any) -> int:
    """Bytes of the tensors among ``tensors`` (Adam's state dicts hold other values too)."""
    return sum(t.numel() * t.element_size() for t in tensors if hasattr(t, "element_size"))


def optimizer_state_bytes(optimizer: Any) -> dict[str, int]:
    """Bytes the Megatron optimizer holds beyond the model: the Adam state tensors of every inner torch optimizer
    (exp_avg, exp_avg_sq, step) and the fp32 master copies of bf16 parameters (plain or distributed optimizer).
    Read after a step: Adam creates its state on the first update."""
    adam = master = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            adam += _nbytes(state.values())
        for name in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
            master += sum(_nbytes(group) for group in getattr(opt, name, None) or [])
    return {"adam_bytes": adam, "master_bytes": master}


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def worker(spec: dict[str, Any]) -> None:
    """One arm in this (fresh) process: build the trainer, run warm-up + timed steps, print what it holds."""
    import torch

    from rao_megatron.config import load_config
    from rao_megatron.training.loop import Trainer

    torch.set_num_threads(spec["threads"])
    cfg = load_config(CONFIG, spec["overrides"])
    trainer = Trainer(cfg)
    init_peak = _peak_rss_gib()
    records = []
    for _ in range(spec["warmup"] + spec["steps"]):
        cpu0 = time.process_time()
        records.append({**trainer.train_step(), "cpu_s": time.process_time() - cpu0})
    params = [p for c in trainer.chunks for p in c.parameters()]
    grad_buffers = [b.grad_data for c in trainer.chunks for b in (*c.buffers, *c.expert_parallel_buffers)]
    print_result(total_params=sum(p.numel() for p in params),
                 trainable_params=sum(p.numel() for p in params if p.requires_grad),
                 grad_buffer_bytes=_nbytes(grad_buffers), **optimizer_state_bytes(trainer.optimizer),
                 init_peak_rss_gib=init_peak,
                 step_times=[r["step_time_s"] for r in records[spec["warmup"]:]],
                 step_cpu=[r["cpu_s"] for r in records[spec["warmup"]:]], load_avg=os.getloadavg()[0],
                 losses=[r["loss"] for r in records])


def run_arm(arm: str, rep: int, common: list[str], tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    spec = {"threads": args.threads, "warmup": args.warmup, "steps": args.steps,
            "overrides": [*common, *ARMS[arm][1], f"train.output_dir={tmp / f'{arm}_{rep}'}"]}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    out = run_result_worker([sys.executable, __file__, "--worker", json.dumps(spec)], env,
                            f"worker failed ({arm}, run {rep})")
    out["step_time_s"] = statistics.median(out["step_times"])
    out["step_cpu_s"] = statistics.median(out["step_cpu"])
    out["state_bytes"] = out["adam_bytes"] + out["master_bytes"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 run per arm, 1 warm-up + 1 timed step of 2 groups")
    p.add_argument("--repeats", type=int, default=None, help="runs per arm (default 2; --quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first in every run")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 3; --quick 1)")
    p.add_argument("--groups", type=int, default=None, help="groups per optimizer step (default 8; --quick 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="keep the runs and results.json here (default: a temp dir)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    quick = args.quick
    args.repeats = args.repeats or (1 if quick else 2)
    args.steps = args.steps or (1 if quick else 3)
    args.groups = args.groups or (2 if quick else 8)
    t_all = time.perf_counter()
    ensure_smollm2(need_megatron=True)
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmpdir:
        tmp = Path(args.out).resolve() if args.out else Path(tmpdir)
        tmp.mkdir(parents=True, exist_ok=True)
        data = write_jsonl(arithmetic_groups(args.groups * (args.warmup + args.steps)), tmp / "groups.jsonl")
        common = [f"model.init_checkpoint={SMOLLM2_MEGATRON}", "parallel.tp=1", "parallel.pp=1",
                  f"data.train_path={data}", "data.eval_fraction=0", f"data.reference_cache={tmp / 'reference.safetensors'}",
                  f"train.global_batch_groups={args.groups}", f"train.steps={args.warmup + args.steps}",
                  "train.eval_every=0", "checkpoint.save_at_end=false", "checkpoint.save_every=0"]
        t0 = time.perf_counter()
        run_command(python_module("rao_megatron.cli.precompute_reference", "--config", CONFIG, *common,
                                  f"train.output_dir={tmp / 'precompute'}"))
        print(f"reference cache of {data.name}: {time.perf_counter() - t0:.0f} s", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
        names = list(ARMS)
        for rep in range(args.repeats):
            for arm in names[rep % len(names):] + names[:rep % len(names)]:
                r = run_arm(arm, rep, common, tmp, args)
                runs[arm].append(r)
                print(f"  run {rep} {arm:<18}: step {r['step_time_s']:.2f} s ({r['step_cpu_s']:.1f} CPU s; timed "
                      f"{len(r['step_times'])}), "
                      f"optimizer state {r['state_bytes'] / 2**20:.1f} MiB, peak RSS {r['peak_rss_gib']:.2f} GiB "
                      f"({r['init_peak_rss_gib']:.2f} at start-up), load average {r['load_avg']:.1f}, "
                      f"{r['wall_s']:.0f} s", flush=True)
        print(render(runs, args))
        print(f"\nwhole benchmark: {time.perf_counter() - t_all:.0f} s")
        if args.out:
            (tmp / "results.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1) + "\n")
            print(f"{tmp / 'results.json'}")
    return 0


def _cell(values: list[float], fmt: str) -> str:
    """One figure when every run measured the same (the parameter and byte counts), else median (min-max)."""
    return format(values[0], fmt) if len(set(values)) == 1 else spread(values, fmt)


def render(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    """The per-arm table (median over runs, min-max) and the full / LoRA ratios within each repeat."""
    mib = 2**20
    lines = [f"\nSmolLM2-135M-Instruct, RAO, fp32, TP1 on CPU ({args.threads} threads); {args.groups} groups x 4 "
             f"answers per step, max_length 64; {args.warmup} warm-up + {args.steps} timed steps per run, "
             f"{args.repeats} run(s) per arm; median over runs (min-max); 1-minute load average at the runs' ends "
             f"{spread([r['load_avg'] for rs in runs.values() for r in rs], '.1f')} on {os.cpu_count()} cores",
             "| arm | trainable params | optimizer state (MiB) | grad buffers (MiB) | peak RSS (GiB) | "
             "peak RSS at start-up (GiB) | step time (s) | CPU s per step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, rs in runs.items():
        r0 = rs[0]
        lines.append(f"| {ARMS[arm][0]} | {r0['trainable_params']:,} ({100 * r0['trainable_params'] / r0['total_params']:.2f} %) | "
                     f"{_cell([r['state_bytes'] / mib for r in rs], '.1f')} | "
                     f"{_cell([r['grad_buffer_bytes'] / mib for r in rs], '.1f')} | "
                     f"{spread([r['peak_rss_gib'] for r in rs], '.2f')} | "
                     f"{spread([r['init_peak_rss_gib'] for r in rs], '.2f')} | "
                     f"{spread([r['step_time_s'] for r in rs], '.2f')} | "
                     f"{spread([r['step_cpu_s'] for r in rs], '.1f')} |")
    lines.append("")
    for arm in ("lora_cached", "lora_adapters_off"):
        pairs = list(zip(runs["full"], runs[arm]))
        state = [a["state_bytes"] / b["state_bytes"] for a, b in pairs]
        rss = [a["peak_rss_gib"] / b["peak_rss_gib"] for a, b in pairs]
        step = [a["step_time_s"] / b["step_time_s"] for a, b in pairs]
        cpu = [a["step_cpu_s"] / b["step_cpu_s"] for a, b in pairs]
        lines.append(f"full / {arm}: trainable params x{pairs[0][0]['trainable_params'] / pairs[0][1]['trainable_params']:.0f}, "
                     f"optimizer state x{_cell(state, '.0f')} ({'>= 50x: met' if min(state) >= 50 else '< 50x: missed'}), "
                     f"peak RSS x{spread(rss, '.2f')} ({'LoRA lower' if min(rss) > 1 else 'LoRA not lower in every run'}), "
                     f"step time x{spread(step, '.2f')}, CPU s per step x{spread(cpu, '.2f')}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
