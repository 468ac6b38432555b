"""RAO against the baselines on the quick-start task: same data, budget, seed and start; one run, side by side.

    python benchmarks/alignment.py                              # uses / completes runs/demo up to `reference`
    python benchmarks/alignment.py --methods rao,dpo --steps 8 --out runs/alignment

For each method (default: DPO, SimPO, RPO, GRAO, RAO) it trains SmolLM2-135M-Instruct from the demo's
Megatron start on the demo's rule-scored groups (K sampled answers per arithmetic prompt) with the demo
config (PP2 over gloo on CPU) -- only ``loss.name`` (and the loss's own hyper-parameters) differ -- then:

- likelihood displacement: Δ_R(y_w) = log π_θ(y_w|x) − log π_ref(y_w|x) of the preferred answers (the
  best-rewarded answer of every training group whose rewards differ), at the start, at each saved
  checkpoint and at the end: the mean, and the share of preferred answers made *less* likely (Δ_R < 0);
- held-out accuracy: answers to the demo's held-out prompts (same sampling seed for every model), scored
  by the exact-final-number rule;
- wall time of the training run.

GRAO gets each group's reference answer (the correct number, reward 1) appended, as its loss requires;
the other methods see the sampled answers only. Pairwise losses (DPO, SimPO, RPO) drop the groups whose
answers all have the same reward (no preference pair; counted in their training log) -- RAO and GRAO use
every group. Writes ``<out>/alignment.json``, ``<out>/alignment.md`` and ``<out>/alignment.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rao_megatron.cli.chain import fresh_dir, python_module, run_command, torchrun_module  # noqa: E402
from rao_megatron.rewards.synthetic import write_jsonl  # noqa: E402

CONFIG = REPO / "examples/configs/rao_smollm2_demo.yaml"
REWARD_FN = "rao_megatron.rewards.rule:exact_final_number"
#: each method's own hyper-parameters (the loss library's defaults otherwise); everything else is shared
METHOD_ARGS = {
    "dpo": ["loss.beta=0.1"],
    "simpo": ["loss.beta=2.0", "loss.gamma=1.0"],
    "rpo": ["loss.beta=0.1"],
    "grao": ["loss.beta=0.5", "loss.lam=0.6"],
    "rao": ["loss.beta=0.1", "loss.z0=50"],
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def grao_groups(groups: list[dict], prompts: dict[str, dict]) -> list[dict]:
    """The groups with the task's reference answer appended (scored by the same rule: 1 by construction)."""
    from rao_megatron.rewards.rule import exact_final_number

    out = []
    for g in groups:
        ref = prompts[str(g["id"])]["reference"]
        out.append({**g, "reference": ref, "reference_reward": exact_final_number(g["prompt"], ref, g)})
    return out


def preferred_probe(groups: list[dict]) -> list[dict]:
    """One single-answer row per group whose rewards differ: its best answer (first of the best on ties)."""
    probe = []
    for g in groups:
        rewards = g["rewards"]
        if max(rewards) > min(rewards):
            best = rewards.index(max(rewards))
            probe.append({"prompt": g["prompt"], "responses": [g["responses"][best]], "rewards": [rewards[best]]})
    return probe


def response_logps(cache: Path) -> dict[int, float]:
    from safetensors.torch import load_file

    t = load_file(str(cache))
    return dict(zip(t["seq_keys"].tolist(), t["response_logps"].tolist()))


def probe_logps(args: argparse.Namespace, checkpoint: Path, probe: Path, cache: Path) -> dict[int, float]:
    """log π(y_w | x) of every probe answer under ``checkpoint`` (forward only, the demo's layout)."""
    if not cache.is_file():
        run_command(torchrun_module(args.procs, "rao_megatron.cli.precompute_reference", "--config", CONFIG,
                                    f"model.init_checkpoint={checkpoint}", f"data.train_path={probe}",
                                    f"data.reference_cache={cache}", "data.eval_fraction=0",
                                    f"train.output_dir={cache.parent}"))
    return response_logps(cache)


def displacement(start: dict[int, float], now: dict[int, float]) -> dict[str, float]:
    deltas = [now[k] - start[k] for k in start]
    return {"mean_delta_r": sum(deltas) / len(deltas), "share_lowered": sum(d < 0 for d in deltas) / len(deltas)}


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    found = []
    for d in sorted((run / "checkpoints").glob("step_*")):
        if d.is_dir() and d.name[5:].isdigit():
            found.append((int(d.name[5:]), d))
    return found


def accuracy(args: argparse.Namespace, hf_dir: Path, out: Path) -> dict:
    if not out.is_file() or len(read_jsonl(out)) < args.heldout_prompts:
        run_command(python_module("rao_megatron.cli.generate", "--model", hf_dir, "--prompts", args.heldout,
                                  "--out", out, "--n", args.k, "--max-new-tokens", args.max_new_tokens,
                                  "--temperature", args.temperature, "--seed", 1, "--backend", "hf",
                                  "--no-progress"))
    from rao_megatron.rewards.answers import evaluate_answers
    from rao_megatron.rewards.rule import exact_final_number

    result = evaluate_answers([str(out)], reward_fn=exact_final_number)["results"][0]
    return {"accuracy": result["accuracy"], "pass@1": result["pass@1"], "mean_chars": result["mean_chars"]}


def run_method(args: argparse.Namespace, method: str, data: Path, probe: Path, start_logps: dict[int, float]) -> dict:
    out = args.out / method
    result_file = out / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    save_every = max(1, args.steps // args.points)
    t0 = time.time()
    run_command(torchrun_module(
        args.procs, "rao_megatron.cli.train", "--config", CONFIG, f"loss.name={method}", *METHOD_ARGS[method],
        f"model.init_checkpoint={args.demo / 'start_megatron'}", f"data.train_path={data}",
        f"train.output_dir={fresh_dir(out / 'train')}", f"train.steps={args.steps}", "train.eval_every=0",
        f"checkpoint.save_every={save_every}", f"checkpoint.keep_last={args.points + 1}"))
    wall = time.time() - t0
    curve = [{"step": 0, "mean_delta_r": 0.0, "share_lowered": 0.0}]
    for step, ckpt in checkpoints(out / "train"):
        now = probe_logps(args, ckpt, probe, out / f"probe_step{step}.safetensors")
        curve.append({"step": step, **displacement(start_logps, now)})
    run_command(python_module("rao_megatron.cli.convert", "megatron-to-hf", "--megatron", out / "train/checkpoints",
                              "--out", fresh_dir(out / "hf"), "--no-progress"))
    acc = accuracy(args, out / "hf", out / "heldout_answers.jsonl")
    metrics = read_jsonl(out / "train" / "metrics.jsonl")
    result = {"method": method, "train_seconds": round(wall, 1), "steps": args.steps, **acc, "delta_r": curve,
              "final_loss": next((r["loss"] for r in reversed(metrics) if "loss" in r), None)}
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


def table(start: dict, results: list[dict]) -> str:
    lines = ["| method | held-out accuracy | pass@1 | mean answer chars | mean Δ_R(y_w) at end | y_w made less likely |"
             " train wall time |", "|---|---|---|---|---|---|---|",
             f"| start (SmolLM2-135M-Instruct) | {start['accuracy']:.3f} | {start['pass@1']:.3f} | "
             f"{start['mean_chars']:.1f} | 0 | 0% | — |"]
    for r in results:
        end = r["delta_r"][-1]
        lines.append(f"| {r['method']} | {r['accuracy']:.3f} | {r['pass@1']:.3f} | {r['mean_chars']:.1f} | "
                     f"{end['mean_delta_r']:+.2f} | {100 * end['share_lowered']:.0f}% | {r['train_seconds']:.0f} s |")
    return "\n".join(lines)


def plot(results: list[dict], start: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        steps = [p["step"] for p in r["delta_r"]]
        a.plot(steps, [p["mean_delta_r"] for p in r["delta_r"]], marker="o", label=r["method"])
    a.axhline(0, color="grey", lw=0.8)
    a.set(xlabel="optimizer step", ylabel="mean Δ_R of preferred answers", title="likelihood of y_w vs reference")
    a.legend()
    names = ["start"] + [r["method"] for r in results]
    b.bar(names, [start["accuracy"]] + [r["accuracy"] for r in results], color="tab:blue")
    b.set(ylabel="held-out accuracy", title="held-out arithmetic accuracy", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default=str(REPO / "runs/demo"), help="the quick-start's run directory")
    p.add_argument("--out", default=str(REPO / "runs/alignment"))
    p.add_argument("--methods", default="dpo,simpo,rpo,grao,rao")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per method (the demo config's batch)")
    p.add_argument("--points", type=int, default=2, help="checkpoints per run at which Δ_R is measured")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--k", type=int, default=4, help="held-out answers per prompt")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--temperature", type=float, default=0.8)
    args = p.parse_args()
    args.demo, args.out = Path(args.demo).resolve(), Path(args.out).resolve()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHOD_ARGS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHOD_ARGS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    # the demo's data, start checkpoint and reference cache (its first six stages)
    run_command(python_module("rao_megatron.cli.demo", "--out", args.demo, "--until", "reference"))
    data_dir = args.demo / "data"
    groups = read_jsonl(data_dir / "train_groups.jsonl")
    prompts = {str(r["id"]): r for r in read_jsonl(data_dir / "train_prompts_grao.jsonl")}
    args.heldout = data_dir / "heldout_prompts.jsonl"
    args.heldout_prompts = len(read_jsonl(args.heldout))
    grao_data = write_jsonl(grao_groups(groups, prompts), args.out / "train_groups_grao.jsonl")
    probe = write_jsonl(preferred_probe(groups), args.out / "probe_preferred.jsonl")
    start_logps = probe_logps(args, args.demo / "start_megatron", probe, args.out / "probe_start.safetensors")
    start = accuracy(args, REPO / ".cache/smollm2-hf",
                     args.out / "start_heldout_answers.jsonl")
    results = []
    for m in methods:
        print(f"\n=== {m} ===", flush=True)
        data = grao_data if m == "grao" else data_dir / "train_groups.jsonl"
        results.append(run_method(args, m, data, probe, start_logps))
    summary = {"start": start, "results": results, "steps": args.steps, "probe_answers": len(start_logps),
               "train_groups": len(groups), "heldout_prompts": args.heldout_prompts, "k": args.k}
    (args.out / "alignment.json").write_text(json.dumps(summary, indent=1) + "\n")
    md = table(start, results)
    (args.out / "alignment.md").write_text(md + "\n")
    plot(results, start, args.out / "alignment.png")
    print("\n" + md)
    print(f"\n{args.out / 'alignment.json'}, {args.out / 'alignment.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
