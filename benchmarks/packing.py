"""Padded vs packed micro-batches on a ragged UltraFeedback-like length mix, side by side in one run.

    python benchmarks/packing.py --quick     # tiny model, 2 groups/step, 1 timed step: smoke test, ~2 minutes
    python benchmarks/packing.py             # tiny + SmolLM2-135M-Instruct on CPU: 32 minutes on a shared 2-core box
    python benchmarks/packing.py --models smollm2 --repeats 1   # SmolLM2 only, one run per layout

SmolLM2's padded step held ~18 GiB with Megatron's unfused attention, which materialized [rows, heads, 1024,
1024] scores per layer (the local spec runs PyTorch's SDPA since 2026-12-03).

RAO (β 0.1, Z0 50) with a precomputed reference (``train.reference=cached``, one cache per model, made
once before timing and shared by both layouts), max_length 1024, one process (1-rank gloo), fp32, two
torch threads. The data is ``benchmarks/ultrafeedback_mix.py`` (groups of a prompt + 4 responses,
log-normal lengths, mean ~250 real tokens per sequence at the SmolLM2 tokenizer: ~75 % of a padded
micro-batch is padding). Both layouts see the same groups in the same order (same data seed).

- padded: ``data.packing=false``, one group (4 rows x max_length) per micro-batch;
- packed: ``data.packing=true``, ``data.micro_batch_tokens`` = rows x max_length (per model, below).

Every (model, layout, repeat) runs in a fresh subprocess (``--worker``): ``Trainer(cfg).run()`` with
``train.steps = warmup + timed``; the figures come from the run's own ``metrics.jsonl`` (``step_time_s``,
``tokens_per_s`` = real tokens / step time, ``packing_efficiency`` = real tokens / token slots; padding
share = 1 - packing_efficiency) and the worker's peak RSS (``ru_maxrss``). The layouts alternate
(padded first on even repeats, packed first on odd ones) to spread machine noise; the table gives the
median of each run's median over its timed steps, and the min-max over runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the `benchmarks` package (and rao_megatron) import from the root

from benchmarks import ultrafeedback_mix as mix  # noqa: E402
from benchmarks.common import print_result, run_result_worker, spread, target_verdict  # noqa: E402

SMOLLM2_HF = ROOT / ".cache/smollm2-hf"
SMOLLM2_MEGATRON = ROOT / ".cache/bench/smollm2-megatron"
CONFIG = ROOT / "examples/configs/rao_tiny.yaml"

#: per model: groups per optimizer step, packed rows per micro-batch, timed steps and runs per layout (full;
#: --quick: 1 and 1). SmolLM2's padded step is 8 rows x 1024 tokens of a 135M model: 1.5-3 minutes on 2 cores.
MODELS = {
    "tiny": {"groups": 4, "packed_rows": 4, "steps": 3, "repeats": 3,
             "what": "random Llama, hidden 64, 2 layers, 4 heads / 2 KV groups, SmolLM2 vocabulary (49152)"},
    "smollm2": {"groups": 2, "packed_rows": 2, "steps": 1, "repeats": 2,
                "what": "SmolLM2-135M-Instruct (30 layers, hidden 576), converted from .cache/smollm2-hf"},
}


def ensure_smollm2(need_megatron: bool) -> None:
    """The HF extraction (tests share it) and, for the SmolLM2 rows, its Megatron conversion (cached)."""
    if not (SMOLLM2_HF / "extracted_from.json").is_file():
        from rao_megatron.models.smollm2 import extract_smollm2

        extract_smollm2(SMOLLM2_HF)
    if need_megatron and not (SMOLLM2_MEGATRON / "rao_model.json").is_file():
        subprocess.run([sys.executable, "-m", "rao_megatron.cli.convert", "hf-to-megatron", "--hf", str(SMOLLM2_HF),
                        "--out", str(SMOLLM2_MEGATRON), "--no-progress"], check=True)


def tiny_model_dir(tmp: Path) -> Path:
    from transformers import AutoTokenizer

    from rao_megatron.models.hf_config import tiny_hf_config

    d = tmp / "tiny_model"
    d.mkdir(exist_ok=True)
    vocab = len(AutoTokenizer.from_pretrained(str(SMOLLM2_HF)))
    cfg = tiny_hf_config("llama", vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    return d


def model_overrides(model: str, tmp: Path) -> list[str]:
    if model == "tiny":
        return [f"model.hf_config={tiny_model_dir(tmp)}", "model.preset=null", f"model.tokenizer={SMOLLM2_HF}"]
    return [f"model.init_checkpoint={SMOLLM2_MEGATRON}", "model.preset=null"]


def layout_fill(m: dict, max_length: int, seed: int, steps: int = 64) -> dict:
    """Token slots filled over ``steps`` steps of the mix (planning only, no model): the timed steps are few, and
    how tightly a step's groups pack varies from step to step."""
    from transformers import AutoTokenizer

    from rao_megatron.data.packing import plan_micro_batches

    tok = AutoTokenizer.from_pretrained(str(SMOLLM2_HF))
    groups = mix.make_groups(m["groups"] * steps, seed=seed + 1)
    lengths = []
    for g in groups:
        x = tok.apply_chat_template([{"role": "user", "content": g["prompt"]}], add_generation_prompt=True,
                                    tokenize=False)
        nx = len(tok(x, add_special_tokens=False)["input_ids"])
        lengths.append([min(max_length, nx + len(tok(y, add_special_tokens=False)["input_ids"]) + 1)
                        for y in g["responses"]])
    real = packed = 0
    for i in range(0, len(lengths), m["groups"]):
        part = lengths[i:i + m["groups"]]
        real += sum(map(sum, part))
        packed += len(plan_micro_batches(part, rows=m["packed_rows"], seq_length=max_length)) * m["packed_rows"]
    padded = len(lengths) * 4
    return {"steps": steps, "padded_fill": real / (padded * max_length), "packed_fill": real / (packed * max_length),
            "slot_ratio": padded / packed}


def run_worker(spec: dict) -> dict:
    """One training run in a fresh process; returns its timed records and peak RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    return run_result_worker([sys.executable, __file__, "--worker", json.dumps(spec)], env,
                             f"worker failed ({spec['label']})")


def worker(spec: dict) -> None:
    import torch

    from rao_megatron.config import load_config
    from rao_megatron.training.loop import Trainer

    torch.set_num_threads(spec["threads"])
    cfg = load_config(spec.get("config", CONFIG), spec["overrides"])
    trainer = Trainer(cfg)
    trainer.run()
    records = [json.loads(x) for x in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines() if x]
    timed = [r for r in records if r["step"] > spec["warmup"]]
    print_result(records=[{k: r.get(k) for k in ("step", "loss", "step_time_s", "tokens_per_s", "packing_efficiency",
                                                         "shared_prompt_ratio")}
                          for r in timed])


def summarize(run: dict) -> dict:
    recs = run["records"]
    return {"step_time_s": statistics.median(r["step_time_s"] for r in recs),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in recs),
            "padding_share": 1 - statistics.mean(r["packing_efficiency"] for r in recs),
            "peak_rss_gib": run["peak_rss_gib"], "losses": [r["loss"] for r in recs]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, 2 groups per step into 2-row packed micro-batches, "
                                                        "1 timed step, 1 run per layout (a smoke test)")
    p.add_argument("--models", default=None, help="comma list of tiny,smollm2 (default: both; --quick: tiny)")
    p.add_argument("--repeats", type=int, default=None, help="runs per layout (default per model; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default per model)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first in every run")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="data seed of the length mix")
    p.add_argument("--out", default=None, help="keep runs and results.json here (default: a temp dir)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    models = (args.models or ("tiny" if args.quick else "tiny,smollm2")).split(",")
    ensure_smollm2("smollm2" in models)
    with tempfile.TemporaryDirectory(prefix="bench_packing_") as tmpdir:
        tmp = Path(args.out).resolve() if args.out else Path(tmpdir)
        tmp.mkdir(parents=True, exist_ok=True)
        results: dict[str, dict] = {}
        for model in models:
            m = dict(MODELS[model])
            if args.quick:  # half the groups per step, packed into 2-row micro-batches: a smoke test, not the figures
                m.update(groups=2, packed_rows=2)
            steps = args.steps or (1 if args.quick else m["steps"])
            repeats = args.repeats or (1 if args.quick else m["repeats"])
            total = args.warmup + steps
            data = mix.write_jsonl(mix.make_groups(m["groups"] * total, seed=args.seed), tmp / model / "groups.jsonl")
            stats = mix.token_stats(mix.make_groups(m["groups"] * total, seed=args.seed), str(SMOLLM2_HF),
                                    args.max_length)
            common = [*model_overrides(model, tmp), "loss.name=rao", "loss.beta=0.1", "loss.z0=50",
                      f"data.train_path={data}", "data.eval_fraction=0", f"data.max_length={args.max_length}",
                      "data.overlength=truncate", "data.groups_per_micro_batch=1",
                      f"data.reference_cache={tmp / model / 'reference.safetensors'}",
                      f"train.global_batch_groups={m['groups']}", f"train.steps={total}", "train.eval_every=0",
                      "train.warmup_steps=0", "train.lr=1e-5", "train.reference=cached",
                      "checkpoint.save_at_end=false", "checkpoint.save_every=0"]
            layouts = {"padded": ["data.packing=false"],
                       "packed": ["data.packing=true", f"data.micro_batch_tokens={m['packed_rows'] * args.max_length}",
                                  "data.shared_prompt=false"]}  # one prompt per response: benchmarks/shared_prompt.py
            print(f"\n=== {model}: {m['what']}\n    {m['groups']} groups x 4 responses per step, max_length "
                  f"{args.max_length}, {args.warmup} warm-up + {steps} timed steps, {repeats} run(s) per layout; "
                  f"mix: mean {stats['mean_tokens']:.0f} real tokens/sequence (median {stats['median_tokens']}, "
                  f"p95 {stats['p95_tokens']}, max {stats['max_tokens']})", flush=True)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "rao_megatron.cli.precompute_reference", "--config", str(CONFIG),
                            *common, "data.packing=true", f"train.output_dir={tmp / model / 'precompute'}"],
                           check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            print(f"    reference cache: {time.perf_counter() - t0:.0f} s", flush=True)
            runs: dict[str, list[dict]] = {"padded": [], "packed": []}
            for rep in range(repeats):
                order = ("padded", "packed") if rep % 2 == 0 else ("packed", "padded")
                for layout in order:
                    spec = {"label": f"{model}/{layout}/{rep}", "threads": args.threads, "warmup": args.warmup,
                            "overrides": [*common, *layouts[layout],
                                          f"train.output_dir={tmp / model / f'{layout}_{rep}'}"]}
                    s = summarize(run_worker(spec))
                    runs[layout].append(s)
                    print(f"    run {rep} {layout:<6}: step {s['step_time_s']:.2f} s, {s['tokens_per_s']:.0f} real "
                          f"tokens/s, padding {100 * s['padding_share']:.1f} %, peak RSS {s['peak_rss_gib']:.2f} GiB",
                          flush=True)
            fill = layout_fill(m, args.max_length, args.seed)
            print(f"    over {fill['steps']} other steps of the mix (planning only): slots filled padded "
                  f"{100 * fill['padded_fill']:.1f} %, packed {100 * fill['packed_fill']:.1f} %, "
                  f"{fill['slot_ratio']:.2f}x fewer slots packed", flush=True)
            results[model] = {"runs": runs, "mix": stats, "fill": fill, "groups_per_step": m["groups"],
                              "packed_rows": m["packed_rows"], "timed_steps": steps, "repeats": repeats,
                              "wall_s": time.perf_counter() - t0}
        print(render(results, args.max_length))
        if args.out:
            (tmp / "results.json").write_text(json.dumps(results, indent=1) + "\n")
            print(f"\n{tmp / 'results.json'}")
    return 0


def render(results: dict, max_length: int) -> str:
    lines = [f"\nmax_length {max_length}; median over runs (min-max); ratio = packed / padded per repeat pair",
             "| model | layout | micro-batch | real tokens/s | padding share | step time (s) | peak RSS (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for model, r in results.items():
        for layout in ("padded", "packed"):
            runs = r["runs"][layout]
            shape = "4 rows (1 group)" if layout == "padded" else f"{r['packed_rows']} rows"
            lines.append(f"| {model} | {layout} | {shape} | {spread([x['tokens_per_s'] for x in runs], '.0f')} | "
                         f"{spread([100 * x['padding_share'] for x in runs], '.1f')} % | "
                         f"{spread([x['step_time_s'] for x in runs], '.2f')} | "
                         f"{spread([x['peak_rss_gib'] for x in runs], '.2f')} |")
    lines.append("")
    for model, r in results.items():
        pairs = list(zip(r["runs"]["padded"], r["runs"]["packed"]))
        tps = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in pairs]
        st = [b["step_time_s"] / a["step_time_s"] for a, b in pairs]
        verdict = target_verdict(tps, 2)
        lines.append(f"{model}: packed / padded real tokens/s x{spread(tps, '.2f')}, step time x{spread(st, '.2f')}"
                     f" -> target >= 2x {verdict}; over {r['fill']['steps']} steps of the mix packing fills "
                     f"{100 * r['fill']['packed_fill']:.0f} % of the slots vs {100 * r['fill']['padded_fill']:.0f} % "
                     f"padded ({r['fill']['slot_ratio']:.2f}x fewer)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
