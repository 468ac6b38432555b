"""Tokenize once vs every rank tokenizing: start-up seconds and host memory per rank, side by side.

    python benchmarks/tokenize_once.py                    # 1k / 10k / 40k rows, DP2, SmolLM2 tokenizer if cached
    python benchmarks/tokenize_once.py --rows 1000 --quick

Rows come from the UltraFeedback-like mix of ``benchmarks/ultrafeedback_mix.py`` (4 responses per prompt).
For each size, in fresh 2-rank gloo worlds: ``token_store=false`` (today's path: every rank reads and
tokenizes), the store built cold (rank 0 tokenizes and writes, rank 1 waits), and the store warm (both
ranks memory-map it). Per rank: seconds in ``load_groups`` and the growth of its private (anonymous) RSS,
per token -- file-backed pages of the store are shared through the page cache and reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the `benchmarks` package (and rao_megatron) import from the root


def _rss_kib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def _worker(data: str, tokenizer: str | None, store: bool, result: str) -> None:
    import torch.distributed as dist

    from rao_megatron.config import load_config
    from rao_megatron.training import run_data

    overrides = [f"data.train_path={data}", "data.max_length=1024", "data.eval_fraction=0",
                 f"data.token_store={str(store).lower()}", "data.overlength=truncate"]
    if tokenizer:
        overrides.append(f"model.tokenizer={tokenizer}")
    cfg = load_config(ROOT / "examples/configs/rao_tiny.yaml", overrides)
    tok = run_data.load_run_tokenizer(cfg)
    dist.barrier()
    before, start = _rss_kib(), time.perf_counter()
    groups = run_data.load_groups(cfg, tok, cfg.loss.build().spec)
    seconds = time.perf_counter() - start
    after = _rss_kib()
    tokens = sum(len(g.prompt_ids) + sum(len(y) for y in g.responses) for g in groups.train)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {"seconds": seconds, "tokens": tokens,
                                   "anon_kib": after["RssAnon"] - before["RssAnon"],
                                   "file_kib": after["RssFile"] - before["RssFile"]})
    if dist.get_rank() == 0:
        Path(result).write_text(json.dumps(parts))


def measure(data: Path, tokenizer: str | None, store: bool) -> list[dict]:
    from rao_megatron.parallel.launch import run_distributed

    out = data.with_suffix(".result.json")
    run_distributed(_worker, 2, str(data), tokenizer, store, str(out), timeout_s=3600.0)
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1000,10000,40000", help="comma-separated row counts")
    p.add_argument("--quick", action="store_true", help="tiny tokenizer (no SmolLM2), for a smoke test")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from benchmarks.ultrafeedback_mix import make_groups, write_jsonl

    smol = ROOT / ".cache" / "smollm2-hf"
    tokenizer = None if args.quick or not (smol / "tokenizer.json").is_file() else str(smol)
    print(f"tokenizer: {tokenizer or 'tiny test tokenizer'}; DP2 (2 gloo ranks); max_length 1024")
    print("| rows | path | rank | seconds | tokens | private RSS growth | per token | shared file pages |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    work = Path(tempfile.mkdtemp(prefix="tokenize_once_"))
    try:
        for n in (int(x) for x in args.rows.split(",")):
            data = write_jsonl(make_groups(n, seed=n), work / f"rows{n}.jsonl")
            for label, store in (("every rank tokenizes", False), ("store, cold", True), ("store, warm", True)):
                for rank, r in enumerate(measure(data, tokenizer, store)):
                    per = r["anon_kib"] * 1024 / max(r["tokens"], 1)
                    print(f"| {n} | {label} | {rank} | {r['seconds']:.2f} | {r['tokens']} | "
                          f"{r['anon_kib'] / 1024:.1f} MiB | {per:.1f} B | {r['file_kib'] / 1024:.1f} MiB |",
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
