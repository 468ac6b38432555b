"""Peak extra memory and forward+backward time of vocab-parallel log-probs: reference vs fused.

    python benchmarks/logprobs.py                       # CPU: T in {2048, 8192} x H in {1024, 2048}, V=128256
    python benchmarks/logprobs.py --sizes 2048x1024 --precision bf16

CPU: every (size, impl) runs in a fresh subprocess; peak memory is the process's high-water RSS
(``VmHWM``, reset through ``/proc/self/clear_refs`` once the inputs exist) minus the RSS holding the
inputs, so it counts everything the call allocates, grad_h and grad_W included; the "workspace" columns
subtract those two gradients, which any implementation must return. CUDA: the same in one
process via ``torch.cuda.max_memory_allocated``; the Triton kernels are added to the comparison.

FLOP floor: forward logits + the two backward products = 6*T*H*V. "eff" is that floor divided by the
time, as a fraction of a plain ``torch.mm`` of the same dtype measured in the same run (the chunked
path does 8*T*H*V because backward recomputes the logits, so its ceiling is 0.75).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable

import torch


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_inputs(t: int, h: int, v: int, device: str, dtype: torch.dtype):
    """Seeded hidden states ``[T, H]``, output weight ``[V, H]`` (both requiring grad) and labels ``[T]``."""
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(t, h, generator=g) / h**0.25).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.25).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, (t,), generator=g).to(device)
    return hidden, weight, labels


def _step(impl: str, precision: str, hidden, weight, labels, chunk_size: int | None = None) -> None:
    from rao_megatron.logprobs import vocab_parallel_logprobs

    kw = {"chunk_size": chunk_size} if chunk_size else {}
    out = vocab_parallel_logprobs(hidden, weight, labels, impl=impl, precision=precision, **kw)
    out.sum().backward()


def worker(impl: str, t: int, h: int, v: int, precision: str, chunk_size: int | None = None) -> dict:
    """One CPU measurement in this (fresh) process; prints a JSON line."""
    small = make_inputs(64, 64, 512, "cpu", torch.float32)
    _step(impl, precision, *small)  # warm up thread pools / lazy imports outside the measurement
    del small
    hidden, weight, labels = make_inputs(t, h, v, "cpu", torch.float32)
    base = _rss_kib("VmRSS")
    try:  # reset the high-water mark so earlier temporaries (input creation) do not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    _step(impl, precision, hidden, weight, labels, chunk_size if impl != "reference" else None)
    dt = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    label = f"{impl} (chunk {chunk_size})" if chunk_size and impl != "reference" else impl
    return {"impl": label, "T": t, "H": h, "V": v, "time_s": dt, "extra_bytes": (peak - base) * 1024}


def mm_gflops(device: str, dtype: torch.dtype, h: int) -> float:
    """Dense matmul throughput of this machine for the FLOP-fraction column."""
    n = 32768  # wide like the vocab-parallel product, large enough to reach steady-state throughput
    a = torch.randn(2048, h, device=device, dtype=dtype)
    b = torch.randn(h, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):  # best of a few: the first call warms up, others may share the machine
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048 * h * n / best / 1e9


def cuda_time_and_memory(step: Callable[[], None], clear: Callable[[], None], repeats: int = 3) -> dict:
    """CUDA: ``step`` once to compile / warm up, then the median time of ``repeats`` calls (``clear`` before each
    drops the gradients) and the peak memory they allocate beyond what was allocated before them."""
    step()  # compile / warm up
    clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"time_s": sorted(times)[len(times) // 2], "extra_bytes": torch.cuda.max_memory_allocated() - base}


def cuda_measure(impl: str, t: int, h: int, v: int, precision: str) -> dict:
    dtype = torch.bfloat16 if precision != "fp32" else torch.float32
    hidden, weight, labels = make_inputs(t, h, v, "cuda", dtype)

    def clear() -> None:
        hidden.grad = weight.grad = None

    measured = cuda_time_and_memory(lambda: _step(impl, precision, hidden, weight, labels), clear)
    return {"impl": impl, "T": t, "H": h, "V": v, **measured, "elem_bytes": hidden.element_size()}


def run_cpu(impl: str, t: int, h: int, v: int, precision: str, threads: int, chunk_size: int | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TORCHDYNAMO_DISABLE="1")
    cmd = [sys.executable, __file__, "--worker", impl, "--sizes", f"{t}x{h}", "--vocab", str(v),
           "--precision", precision] + (["--chunk-size", str(chunk_size)] if chunk_size else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        return {"impl": impl, "T": t, "H": h, "V": v, "error": res.stderr.strip().splitlines()[-1:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def grad_bytes(r: dict) -> int:
    """Bytes of grad_h [T, H] and grad_W [V, H], which every implementation must return."""
    return (r["T"] + r["V"]) * r["H"] * r.get("elem_bytes", 4)


def table(rows: list[dict], gflops: dict[int, float], ref: str = "reference") -> str:
    head = ("| T | H | impl | time fwd+bwd (s) | time / ref | peak extra mem (GiB) | mem / ref | "
            "workspace excl. grads (GiB) | workspace / ref | FLOP floor 6THV (TFLOP) | achieved TFLOP/s | "
            "eff vs torch.mm |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by_size: dict[tuple[int, int], dict[str, dict]] = {}
    for r in rows:
        by_size.setdefault((r["T"], r["H"]), {})[r["impl"]] = r
    for (t, h), impls in by_size.items():
        base = impls.get(ref)
        for name, r in impls.items():
            if "error" in r:
                lines.append(f"| {t} | {h} | {name} | failed: {r['error']} |" + " |" * 9)
                continue
            flop = 6 * t * h * r["V"]
            ach = flop / r["time_s"] / 1e12
            ok = base is not None and "error" not in base
            tr = f"{r['time_s'] / base['time_s']:.2f}" if ok else "-"
            mr = f"{r['extra_bytes'] / base['extra_bytes']:.3f}" if ok else "-"
            ws = r["extra_bytes"] - grad_bytes(r)
            wr = f"{ws / (base['extra_bytes'] - grad_bytes(base)):.3f}" if ok else "-"
            lines.append(f"| {t} | {h} | {name} | {r['time_s']:.2f} | {tr} | {r['extra_bytes'] / 2**30:.2f} | "
                         f"{mr} | {ws / 2**30:.2f} | {wr} | {flop / 1e12:.2f} | {ach:.3f} | "
                         f"{ach * 1e3 / gflops[h]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2048x1024,2048x2048,8192x1024,8192x2048", help="TxH list")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp8"])
    p.add_argument("--impls", default=None, help="default: reference,chunked (+triton on CUDA)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per worker")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="tokens per chunk of the fused paths (default: the library's default_chunk_size(V))")
    p.add_argument("--rows", default=None, help="re-render the table from saved JSON result lines")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in a.sizes.split(",")]
    if a.worker:
        t, h = sizes[0]
        print(json.dumps(worker(a.worker, t, h, a.vocab, a.precision, a.chunk_size)))
        return
    cuda = torch.cuda.is_available()
    impls = a.impls.split(",") if a.impls else (["reference", "chunked"] + (["triton"] if cuda else []))
    dev = "cuda" if cuda else "cpu"
    mm_dtype = torch.float32 if a.precision == "fp32" else torch.bfloat16
    hs = sorted({h for _, h in sizes}) if not a.rows else sorted({json.loads(x)["H"] for x in open(a.rows)
                                                                    if x.startswith("{")})
    gflops = {h: mm_gflops(dev, mm_dtype, h) for h in hs}
    if cuda:
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{platform.processor() or platform.machine()}, {a.threads} threads, torch {torch.__version__}"
    print(f"# V={a.vocab} precision={a.precision} device={machine}; torch.mm GFLOP/s by H: "
          + ", ".join(f"{h}: {g:.0f}" for h, g in gflops.items()), flush=True)
    rows = []
    if a.rows:  # only re-render: results measured earlier, torch.mm throughput measured now
        with open(a.rows) as f:
            rows = [json.loads(line) for line in f if line.startswith("{")]
        sizes = []
    for t, h in sizes:
        for impl in impls:
            r = cuda_measure(impl, t, h, a.vocab, a.precision) if cuda else \
                run_cpu(impl, t, h, a.vocab, a.precision, a.threads, a.chunk_size)
            print(json.dumps(r), flush=True)
            rows.append(r)
    print(table(rows, gflops))


if __name__ == "__main__":
    main()
