"""The same DPO run through TRL's ``DPOTrainer`` and through ours, alternated in one run, side by side.

    python -m venv .venv-trl && echo '*' > .venv-trl/.gitignore    # once; TRL never enters .venv
    .venv-trl/bin/pip install -c constraints/cpu.txt torch==2.13.0 trl==1.16.0 transformers==5.24.0 datasets accelerate
    python benchmarks/peer_trl.py --quick     # tiny random Llama, about 2 minutes: smoke test
    python benchmarks/peer_trl.py             # SmolLM2-135M-Instruct, 3 alternating pairs: ~50 min on a shared box
    python benchmarks/peer_trl.py --repeats 1 --steps 2       # one pair, ~15 minutes

What is the same on both sides: the weights (SmolLM2-135M-Instruct from .cache/smollm2-hf; ours reads its
Megatron conversion), fp32, the pairs (``benchmarks/ultrafeedback_mix.py``, pairs format, mean ~250 real
tokens per sequence), the token ids (tokenized once by our pipeline -- chat template, response + end of
turn -- and handed to TRL pre-tokenized as ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``), the data
order (our batcher's seeded shuffle, fed to TRL with ``train_sampling_strategy="sequential"``), sigmoid
DPO with β 0.1, the reference log-probs precomputed before training (ours: ``precompute_reference`` +
``train.reference=cached``; TRL: ``precompute_ref_log_probs=True``), AdamW lr 1e-5 constant, betas
(0.9, 0.999), eps 1e-8, no weight decay, gradient clip 1.0, batch 4 pairs per optimizer step, one
process, two torch threads, max_length 1024, no gradient checkpointing (TRL's DPOConfig turns it on by
default; it would add a recompute forward to TRL's step: ``--trl-gradient-checkpointing``).

What differs, by design: ours packs the 8 sequences into ``data.micro_batch_tokens`` / 1024 rows of 1024
tokens (``--micro-batch-tokens``, default 3072: one micro-batch of 3 rows; ``--ours-padded`` adds our
padded layout, every sequence in its own 1024-token row); TRL pads the 8 sequences to the batch's
longest. Ours is Megatron-Core's GPTModel (local spec on CPU: PyTorch's SDPA with an explicit mask);
TRL's is the HF model (SDPA attention) with TRL's fused LM-head log-probs.

Each run is a fresh subprocess (ours: our venv; TRL: ``--trl-python``, default .venv-trl/bin/python);
the order alternates (ours first on even repeats). Step time: ours, ``step_time_s`` of ``train_step``
(batching + forward/backward + optimizer); TRL, the interval between consecutive ``on_step_end``
callbacks (the same work plus the HF loop). Real tokens/s = prompt + response tokens of the step's 8
sequences / step time. Peak RSS is the worker's ``ru_maxrss`` (TRL's includes its reference
precompute, which reuses the policy model; ours precomputes in a separate process). The first step of
every run is a warm-up and not timed. The per-step losses of all runs are printed side by side.
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

from benchmarks.common import print_result, run_result_worker, spread, target_verdict  # noqa: E402

SMOLLM2_HF = ROOT / ".cache/smollm2-hf"
SMOLLM2_MEGATRON = ROOT / ".cache/bench/smollm2-megatron"
CONFIG = ROOT / "examples/configs/rao_tiny.yaml"
BATCH_PAIRS = 4
LR, BETA, BETA2, EPS, CLIP = 1e-5, 0.1, 0.999, 1e-8, 1.0


# ----------------------------------------------------------------------------------------------- workers
def trl_worker(spec: dict) -> None:
    """TRL side (runs under the TRL venv): DPOTrainer on pre-tokenized pairs; prints RESULT {...}."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(spec["threads"])
    rows = [json.loads(x) for x in Path(spec["tokenized"]).read_text().splitlines() if x]

    class PreTokenizedDPO(DPOTrainer):
        """Takes our token ids as they are (TRL would otherwise tokenize the text itself); records losses."""

        losses: list[float] = []
        tokens: list[int] = []

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                loss = out[0] if isinstance(out, tuple) else out
                self.losses.append(float(loss.detach()))
                self.tokens.append(int(inputs["attention_mask"].sum()))
            return out

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.grad_norms: list[float] = []
            self.start = None

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "grad_norm" in logs:
                self.grad_norms.append(float(logs["grad_norm"]))

        def on_step_begin(self, args, state, control, **kw):
            if self.start is None:
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    tok = AutoTokenizer.from_pretrained(spec["hf_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32)
    args = DPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=BATCH_PAIRS, gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=BETA2, adam_epsilon=EPS, max_grad_norm=CLIP,
        optim="adamw_torch", bf16=False, fp16=False, gradient_checkpointing=spec["gradient_checkpointing"],
        precompute_ref_log_probs=True, precompute_ref_batch_size=BATCH_PAIRS, max_length=spec["max_length"],
        beta=BETA, loss_type=["sigmoid"], train_sampling_strategy="sequential", logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        seed=spec["seed"])
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows])
    timer = StepTimer()
    trainer = PreTokenizedDPO(model=model, args=args, train_dataset=dataset, processing_class=tok,
                              callbacks=[timer])
    ids_check = None
    if spec.get("check_ids"):  # TRL's own tokenization of the same text, against our ids
        text = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                   "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                   "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
        theirs = trainer._prepare_dataset(text, tok, args, "ids-check")
        ids_check = compare_ids(rows, theirs, tok)
    trainer.train()
    steps = [b - a for a, b in zip([timer.start, *timer.ends], timer.ends)]
    records = [{"step": i + 1, "loss": PreTokenizedDPO.losses[i], "step_time_s": steps[i],
                "grad_norm": timer.grad_norms[i] if i < len(timer.grad_norms) else None,
                "tokens": PreTokenizedDPO.tokens[i], "slots": None} for i in range(len(steps))]
    print_result(records=records, ids_check=ids_check)


def compare_ids(rows: list[dict], theirs, tok) -> dict:
    same = {"prompt": 0, "chosen": 0, "rejected": 0}
    diff_tail = None
    for r, t in zip(rows, theirs):
        for k in same:
            a, b = r[f"{k}_ids"], t[f"{k}_ids"]
            if a == b:
                same[k] += 1
            elif diff_tail is None:
                n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                diff_tail = {"field": k, "ours_tail": tok.decode(a[n:][:8]), "trl_tail": tok.decode(b[n:][:8])}
    return {"rows": len(rows), "identical": same, "first_difference": diff_tail}


def ours_worker(spec: dict) -> None:
    import torch

    from rao_megatron.config import load_config
    from rao_megatron.training.loop import Trainer

    torch.set_num_threads(spec["threads"])
    cfg = load_config(CONFIG, spec["overrides"])
    trainer = Trainer(cfg)
    records = []
    for _ in range(cfg.train.steps):
        r = trainer.train_step()
        real = r["tokens_per_s"] * r["step_time_s"]  # every sequence's prompt + response tokens
        filled = real / r["shared_prompt_ratio"]  # the slots they fill (a shared prompt fills its slots once)
        records.append({"step": r["step"], "loss": r["loss"], "step_time_s": r["step_time_s"],
                        "grad_norm": r["grad_norm"], "tokens": round(real), "filled": round(filled),
                        "slots": round(filled / r["packing_efficiency"]), "row_tokens": trainer.train_batcher.row_tokens})
    print_result(records=records)


# ------------------------------------------------------------------------------------------------ parent
def ensure_models(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path]:
    """``(HF dir, Megatron dir)`` of the model both sides train."""
    if not (SMOLLM2_HF / "extracted_from.json").is_file():
        from rao_megatron.models.smollm2 import extract_smollm2

        extract_smollm2(SMOLLM2_HF)
    if args.quick:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rao_megatron.models.hf_config import tiny_hf_config

        hf = tmp / "tiny_hf"
        tok = AutoTokenizer.from_pretrained(str(SMOLLM2_HF))
        cfg = tiny_hf_config("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=256,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(hf))
        tok.save_pretrained(str(hf))
        megatron = tmp / "tiny_megatron"
    else:
        hf, megatron = SMOLLM2_HF, SMOLLM2_MEGATRON
    if not (megatron / "rao_model.json").is_file():
        subprocess.run([sys.executable, "-m", "rao_megatron.cli.convert", "hf-to-megatron", "--hf", str(hf),
                        "--out", str(megatron), "--no-progress"], check=True, capture_output=True)
    return hf, megatron


def tokenized_rows(overrides: list[str], pairs: list[dict], steps: int) -> list[dict]:
    """Our tokenization of the pairs, in the order our batcher will train on them (first epoch)."""
    from rao_megatron.config import load_config
    from rao_megatron.data import GroupBatcher
    from rao_megatron.training import run_data

    cfg = load_config(CONFIG, overrides)
    tok = run_data.load_run_tokenizer(cfg)
    groups = run_data.load_groups(cfg, tok, cfg.loss.build().spec).train
    if len(groups) != len(pairs):
        raise SystemExit(f"{len(pairs) - len(groups)} pairs were dropped by tokenization; lower the lengths")
    batcher = GroupBatcher(groups, seq_length=cfg.data.max_length, pad_id=0, groups_per_micro_batch=1,
                           global_batch_groups=BATCH_PAIRS, seed=cfg.data.seed)
    order = batcher._order(0)[:steps * BATCH_PAIRS].tolist()  # the stream next_step() takes, step by step
    rows = []
    for i in order:  # nothing was dropped (checked above), so group i is pair i
        g, src = groups[i], pairs[i]
        ids = [[int(t) for t in seq] for seq in (g.prompt_ids, g.responses[0], g.responses[1])]  # lists or arrays
        rows.append({"prompt_ids": ids[0], "chosen_ids": ids[1], "rejected_ids": ids[2],
                     "prompt": src["prompt"], "chosen": src["chosen"], "rejected": src["rejected"]})
    return rows


def demo_pairs(n: int) -> list[dict]:
    """``n`` pairs from the demo's training groups (``make demo``): the first right and the first wrong answer of
    each prompt that has both, in file order."""
    path = ROOT / "runs/demo/data/train_groups.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run make demo (or python -m rao_megatron.cli.demo --until annotate)")
    pairs = []
    for line in path.read_text().splitlines():
        g = json.loads(line)
        r = g["rewards"]
        if max(r) > min(r):
            pairs.append({"prompt": g["prompt"], "chosen": g["responses"][r.index(max(r))],
                          "rejected": g["responses"][r.index(min(r))]})
    if len(pairs) < n:
        raise SystemExit(f"{path}: {len(pairs)} prompts with a right and a wrong answer, {n} needed")
    return pairs[:n]


def step_flops(config: dict, rows: list[int], head_positions: int) -> float:
    """Training FLOPs of one step (forward + backward = 3 x forward; matmuls only, 2 per multiply-add) of a
    Llama-style model (``config``: its HF config.json): the linear layers on every token slot of ``rows``
    (padding included: it runs through the model), attention scores and their use on every row's full square
    (an explicit mask computes the masked entries too, and SDPA on padded rows the same), and the LM head on
    ``head_positions`` positions."""
    h, layers, ffn = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    d = h // heads
    linear = 2 * (h * h * 2 + 2 * h * kv * d + 3 * h * ffn)  # q, o, k, v, gate/up/down per token and layer
    forward = layers * (linear * sum(rows) + 4 * h * sum(r * r for r in rows)) + 2 * h * config["vocab_size"] * \
        head_positions
    return 3.0 * forward


def run_worker(cmd: list[str], label: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return run_result_worker(cmd, env, f"{label} worker failed")


def summarize(run: dict, warmup: int) -> dict:
    timed = [r for r in run["records"] if r["step"] > warmup]
    return {"step_time_s": statistics.median(r["step_time_s"] for r in timed),
            "tokens_per_s": statistics.median(r["tokens"] / r["step_time_s"] for r in timed),
            "slots": statistics.mean(r["slots"] for r in timed) if timed[0]["slots"] else None,
            "row_tokens": timed[0].get("row_tokens"),
            "peak_rss_gib": run["peak_rss_gib"], "losses": [r["loss"] for r in run["records"]],
            "grad_norms": [r["grad_norm"] for r in run["records"]]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random Llama, 1 timed step, 1 pair (< 2 minutes)")
    p.add_argument("--repeats", type=int, default=None, help="alternating (ours, TRL) pairs (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 3; --quick 1)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--data", choices=("mix", "demo"), default="mix", help="mix: UltraFeedback-like pairs "
                   "(benchmarks/ultrafeedback_mix.py); demo: the quick-start's pairs (a right and a wrong sampled "
                   "answer of each arithmetic prompt, runs/demo: make demo)")
    p.add_argument("--max-length", type=int, default=None, help="default 1024 (mix), 64 (demo)")
    p.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="ours: packed token slots per micro-batch (default 3072 (mix), 512 (demo): one micro-batch)")
    p.add_argument("--ours-padded", action="store_true", help="also run our padded layout (data.packing=false)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's DPOConfig default")
    p.add_argument("--trl-python", default=str(ROOT / ".venv-trl/bin/python"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="data seed of the length mix")
    p.add_argument("--out", default=None, help="keep runs and results.json here (default: a temp dir)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_worker:
        trl_worker(json.loads(Path(args.trl_worker).read_text()))
        return 0
    if args.worker:
        ours_worker(json.loads(Path(args.worker).read_text()))
        return 0
    if not Path(args.trl_python).is_file():
        raise SystemExit(f"{args.trl_python} not found: create the TRL venv (see the top of this file)")
    from benchmarks import ultrafeedback_mix as mix

    args.max_length = args.max_length or (64 if args.data == "demo" else 1024)
    args.micro_batch_tokens = args.micro_batch_tokens or (512 if args.data == "demo" else 3072)
    repeats = args.repeats or (1 if args.quick else 3)
    steps = args.steps or (1 if args.quick else 3)
    total = args.warmup + steps
    with tempfile.TemporaryDirectory(prefix="bench_peer_trl_") as tmpdir:
        tmp = Path(args.out).resolve() if args.out else Path(tmpdir)
        tmp.mkdir(parents=True, exist_ok=True)
        hf, megatron = ensure_models(args, tmp)
        pairs = demo_pairs(BATCH_PAIRS * total) if args.data == "demo" else mix.make_pairs(BATCH_PAIRS * total,
                                                                                             seed=args.seed)
        data = mix.write_jsonl(pairs, tmp / "pairs.jsonl")
        common = [f"model.init_checkpoint={megatron}", "model.preset=null", "model.dtype=fp32",
                  "loss.name=dpo", f"loss.beta={BETA}", f"data.train_path={data}", "data.eval_fraction=0",
                  f"data.max_length={args.max_length}", "data.overlength=drop", "data.groups_per_micro_batch=1",
                  f"data.reference_cache={tmp / 'reference.safetensors'}", f"train.global_batch_groups={BATCH_PAIRS}",
                  f"train.steps={total}", "train.eval_every=0", "train.warmup_steps=0", f"train.lr={LR}",
                  f"train.min_lr={LR}", "train.weight_decay=0", "train.adam_beta1=0.9", f"train.adam_beta2={BETA2}",
                  f"train.clip_grad={CLIP}", "train.reference=cached", "checkpoint.save_at_end=false",
                  "checkpoint.save_every=0"]
        layouts = {"ours packed": ["data.packing=true", f"data.micro_batch_tokens={args.micro_batch_tokens}"]}
        if args.ours_padded:
            layouts["ours padded"] = ["data.packing=false"]
        rows = tokenized_rows(common, pairs, total)
        tokenized = tmp / "tokenized.jsonl"
        tokenized.write_text("".join(json.dumps(r) + "\n" for r in rows))
        lengths = [len(r["prompt_ids"]) + len(r[k]) for r in rows for k in ("chosen_ids", "rejected_ids")]
        model_name = "tiny random Llama (hidden 64, 2 layers, SmolLM2 vocab)" if args.quick else \
            "SmolLM2-135M-Instruct"
        print(f"{model_name}, fp32, DPO β {BETA}, {BATCH_PAIRS} pairs/step, max_length {args.max_length}, "
              f"{args.warmup} warm-up + {steps} timed steps, {repeats} alternating repeat(s); sequences: mean "
              f"{statistics.mean(lengths):.0f} real tokens (max {max(lengths)}); ours: {', '.join(layouts)} "
              f"(micro_batch_tokens {args.micro_batch_tokens}); TRL gradient checkpointing "
              f"{'on' if args.trl_gradient_checkpointing else 'off'}", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rao_megatron.cli.precompute_reference", "--config", str(CONFIG),
                        *common, "data.packing=true", f"data.micro_batch_tokens={args.micro_batch_tokens}",
                        f"train.output_dir={tmp / 'precompute'}"], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"our reference cache: {time.perf_counter() - t0:.0f} s", flush=True)
        runs: dict[str, list[dict]] = {name: [] for name in [*layouts, "TRL"]}
        ids_check = None
        for rep in range(repeats):
            names = [*layouts, "TRL"] if rep % 2 == 0 else ["TRL", *layouts]
            for name in names:
                if name == "TRL":
                    spec = {"tokenized": str(tokenized), "hf_dir": str(hf), "out": str(tmp / f"trl_{rep}"),
                            "steps": total, "max_length": args.max_length, "threads": args.threads,
                            "seed": 1234, "gradient_checkpointing": args.trl_gradient_checkpointing,
                            "check_ids": rep == 0}
                    cmd = [args.trl_python, __file__, "--trl-worker"]
                else:
                    spec = {"threads": args.threads, "overrides": [*common, *layouts[name],
                                                                   f"train.output_dir={tmp / f'ours_{rep}'}"]}
                    cmd = [sys.executable, __file__, "--worker"]
                spec_file = tmp / f"spec_{name.replace(' ', '_')}_{rep}.json"
                spec_file.write_text(json.dumps(spec))
                res = run_worker([*cmd, str(spec_file)], name)
                ids_check = res.get("ids_check") or ids_check
                s = summarize(res, args.warmup)
                runs[name].append(s)
                print(f"  run {rep} {name:<11}: step {s['step_time_s']:.2f} s, {s['tokens_per_s']:.0f} real tokens/s, "
                      f"peak RSS {s['peak_rss_gib']:.2f} GiB, losses {', '.join(f'{x:.6f}' for x in s['losses'])}",
                      flush=True)
        print(render(runs, rows, ids_check))
        print(render_flops(runs, rows, json.loads((hf / "config.json").read_text()), args.warmup))
        if args.out:
            (tmp / "results.json").write_text(json.dumps({"runs": runs, "ids_check": ids_check}, indent=1) + "\n")
            print(f"\n{tmp / 'results.json'}")
    return 0


def render_flops(runs: dict[str, list[dict]], rows: list[dict], config: dict, warmup: int) -> str:
    """FLOPs per timed step of each side (:func:`step_flops`) beside its step time, and against the work of the
    real sequences as they are (each sequence alone, its prompt included, no padding, attention within it; the
    responses' LM head): padding and masked attention raise a side above it, shared prompts take ours below."""
    timed = [rows[i:i + BATCH_PAIRS] for i in range(warmup * BATCH_PAIRS, len(rows), BATCH_PAIRS)]

    def responses(step: list[dict]) -> int:
        return sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in step)

    def longest(step: list[dict]) -> int:
        return max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in step)

    head = statistics.mean(responses(step) for step in timed)
    floor = statistics.mean(step_flops(config, [len(r["prompt_ids"]) + len(r[k]) for r in step
                                                    for k in ("chosen_ids", "rejected_ids")], responses(step))
                            for step in timed)
    # TRL pads the step's 2 x 4 sequences to the longest; its fused LM head (trl.trainer.utils.add_fused_lm_head)
    # projects only the positions with a label, the completions' real tokens, as ours does
    trl = statistics.mean(step_flops(config, [longest(step)] * 2 * len(step), responses(step)) for step in timed)
    lines = ["\nFLOPs per timed step (matmuls, forward + backward; benchmarks/peer_trl.py step_flops):",
             "| side | TFLOP / step | step time (s) | GFLOP/s achieved | / sequences alone |", "|---|---|---|---|---|"]
    for name, rs in runs.items():
        if name == "TRL":
            flops = trl
        else:
            r = rs[0]
            flops = step_flops(config, [r["row_tokens"]] * round(r["slots"] / r["row_tokens"]), head)
        t = statistics.median(x["step_time_s"] for x in rs)
        lines.append(f"| {name} | {flops / 1e12:.3f} | {t:.2f} | {flops / t / 1e9:.1f} | {flops / floor:.2f}x |")
    lines.append(f"| the sequences alone (no padding, one prompt each) | {floor / 1e12:.3f} | | | 1.00x |")
    return "\n".join(lines)


def render(runs: dict[str, list[dict]], rows: list[dict], ids_check: dict | None) -> str:
    trl_slots = statistics.mean(
        2 * len(rows[i:i + BATCH_PAIRS]) * max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
                                               for r in rows[i:i + BATCH_PAIRS])
        for i in range(0, len(rows), BATCH_PAIRS))
    lines = ["\nmedian over runs (min-max); each run's figure is the median over its timed steps",
             "| run | step time (s) | real tokens/s | token slots / step | peak RSS (GiB) |", "|---|---|---|---|---|"]
    for name, rs in runs.items():
        slots = f"{statistics.mean(r['slots'] for r in rs):.0f}" if rs[0]["slots"] else f"{trl_slots:.0f} (all steps)"
        lines.append(f"| {name} | {spread([r['step_time_s'] for r in rs], '.2f')} | "
                     f"{spread([r['tokens_per_s'] for r in rs], '.0f')} | {slots} | "
                     f"{spread([r['peak_rss_gib'] for r in rs], '.2f')} |")
    lines.append("")
    for name in runs:
        if name == "TRL":
            continue
        ratio = [a["step_time_s"] / b["step_time_s"] for a, b in zip(runs[name], runs["TRL"])]
        verdict = target_verdict(ratio, 0.9, at_most=True)
        lines.append(f"{name} / TRL step time: x{spread(ratio, '.2f')} per alternating pair -> target <= 0.9x {verdict}")
    lines.append("\nloss and grad norm (before clipping) per step, run 0 of each (step 1, the warm-up, trains too):")
    names = list(runs)
    lines.append("| step | " + " | ".join(f"{n} loss" for n in names) + " | loss max abs diff | "
                 + " | ".join(f"{n} grad norm" for n in names) + " |")
    lines.append("|---" * (2 * len(names) + 2) + "|")
    for i in range(len(runs["TRL"][0]["losses"])):
        vals = [runs[n][0]["losses"][i] for n in names]
        norms = [runs[n][0]["grad_norms"][i] for n in names]
        lines.append(f"| {i + 1} | " + " | ".join(f"{v:.6f}" for v in vals) + f" | {max(vals) - min(vals):.2e} | "
                     + " | ".join("-" if g is None else f"{g:.6g}" for g in norms) + " |")
    if ids_check:
        lines.append(f"\ntoken ids: TRL was fed ours; TRL's own tokenization of the same text matches ours on "
                     f"{ids_check['identical']} of {ids_check['rows']} rows; first difference: "
                     f"{ids_check['first_difference']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
