"""Check ``vllm``: ``python -m rao_megatron.cli.generate --backend vllm`` on SmolLM2 (SKIP without vllm)."""

from __future__ import annotations

import json
import re

from ..harness import FAIL, PASS, Check, Context, Row, ensure_smollm2, module_cmd

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


CHECK = Check("vllm", "python -m rao_megatron.cli.generate --backend vllm on SmolLM2 (SKIP without vllm)", check_vllm,
              180, ("vllm", "smollm2"))
