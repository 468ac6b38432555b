"""tools/gpu_check.py without a GPU: --dry-run, the no-CUDA exit, --only, its command lines, and its judgements.

The code is the package tools/gpucheck/ (tools/gpu_check.py is its entry script); the tests import its modules.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.gpucheck import cli, harness, judge, report
from tools.gpucheck.checks import kernels, models, moe, multi_gpu, preemption, pytest_gpu, train

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "gpu_check.py"
PACKAGE = REPO / "tools" / "gpucheck"
EXPECTED_CHECKS = ["pytest", "models", "smollm2", "layer_specs", "lora", "train", "preemption", "kernels", "vllm", "multi_gpu", "moe"]
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}


def tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=REPO, env=NO_GPU, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_lists_every_check_and_imports_nothing_heavy(tmp_path):
    out = tmp_path / "out"
    code = (f"import runpy, sys\nsys.argv = ['gpu_check.py', '--dry-run', '--out', {str(out)!r}]\n"
            f"try:\n    runpy.run_path({str(TOOL)!r}, run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
            "heavy = sorted(m for m in ('torch', 'megatron', 'transformers', 'rao_megatron') if m in sys.modules)\n"
            "print('EXIT', code, 'HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=NO_GPU, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "EXIT 0 HEAVY []" in proc.stdout
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == EXPECTED_CHECKS
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists(), "a dry run writes nothing"


def test_dry_run_with_only_lists_the_subset():
    proc = tool("--dry-run", "--only", "kernels,train")
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")] == ["train", "kernels"]


def test_without_cuda_one_line_and_exit_2(tmp_path):
    out = tmp_path / "out"
    proc = tool("--out", str(out))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA device"), proc.stderr
    assert proc.stdout == ""
    assert not out.exists()


@pytest.mark.parametrize("args", [["--only", "train,nope"], ["--only", "nope", "--dry-run"]])
def test_only_with_an_unknown_name_exits_2_naming_the_known_ones(args):
    proc = tool(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "'nope'" in proc.stderr
    assert all(name in proc.stderr for name in EXPECTED_CHECKS)


def test_check_table():
    assert list(cli.CHECK_NAMES) == EXPECTED_CHECKS
    assert all(c.timeout_s > 0 and c.description for c in cli.CHECKS)
    assert all(need in harness.DEPS or need == "smollm2" for c in cli.CHECKS for need in c.needs)
    # one module per check under tools/gpucheck/checks/, named after it (pytest's is pytest_gpu)
    assert all(m.__name__.rsplit(".", 1)[1] in (m.CHECK.name, "pytest_gpu") for m in cli.CHECK_MODULES)


def test_command_table_names_existing_modules():
    # the package is moving its commands: a stale table shows up here, not on the GPU box
    for key, module in harness.COMMANDS.items():
        assert importlib.util.find_spec(module) is not None, f"COMMANDS[{key!r}] = {module!r} does not exist"


def _gpucheck_sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def test_every_import_of_the_package_resolves():
    # the workers import rao_megatron (and benchmarks) inside their functions, which only a GPU box runs: a
    # moved module or function shows up here, not there
    checked = 0
    for path, tree in _gpucheck_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module.split(".")[0] in (
                    "rao_megatron", "benchmarks"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{path.relative_to(REPO)}:{node.lineno}: " \
                                                        f"{node.module} has no {alias.name}"
                    checked += 1
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in ("rao_megatron", "benchmarks"):
                        assert importlib.util.find_spec(alias.name), f"{path.relative_to(REPO)}: {alias.name}"
    assert checked > 10


def test_every_worker_a_check_starts_is_registered():
    started = {node.args[0].value for _, tree in _gpucheck_sources() for node in ast.walk(tree)
               if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "worker"
               and node.args and isinstance(node.args[0], ast.Constant)}
    assert started and started <= set(cli.WORKERS), started - set(cli.WORKERS)
    assert set(cli.WORKERS) - started == {"probe"}  # the probe is started by probe_environment, not by a check


def _config_args(args: list[str]) -> tuple[str, list[str]]:
    assert args[0] == "--config"
    return args[1], args[2:]


def test_every_run_the_checks_start_has_a_valid_config(tmp_path):
    # the NEW keys (parallel.device, parallel.distributed_optimizer) and every override must load
    from rao_megatron.config import load_config

    first_wave = train.train_runs(tmp_path, triton=True)
    fp32 = load_config(*_config_args(first_wave.pop("fp32_packed")[1]))
    assert (fp32.model.dtype, fp32.data.packing, fp32.parallel.device) == ("fp32", True, "cuda")
    runs = [args for _, args in first_wave.values()]
    runs += [train.cached_run(tmp_path)[1], preemption.preemption_args(tmp_path / "p", 12)]
    runs += [multi_gpu.parallel_args(tmp_path / n, *ref, *extra) for n, (ref, extra) in multi_gpu.PARALLEL_LAYOUTS.items()]
    runs += [moe.moe_args(tmp_path / n, 3, *extra) for n, extra in {"one": (), **moe.MOE_LAYOUTS}.items()]
    data = tmp_path / "uneven.jsonl"
    moe.write_uneven_groups(data)
    runs += [moe.uneven_args(tmp_path / "u", data, *extra) for extra in ((), ("data.packing=false",))]
    for args in runs:
        config, overrides = _config_args(args)
        cfg = load_config(config, overrides)
        assert cfg.model.dtype == "bf16" and cfg.parallel.device == "cuda", args
    cfg = load_config(*_config_args(train.train_runs(tmp_path, triton=True)["sft"][1]))
    assert cfg.parallel.distributed_optimizer in (True, "on")
    assert cfg.train.task == "sft" and cfg.train.steps == train.TRAIN_STEPS
    pre = load_config(*_config_args(preemption.preemption_args(tmp_path / "p", 12)))
    assert pre.train.min_lr == pre.train.lr, "the preemption comparison needs an LR schedule independent of steps"


def test_judge_fp32_packed(tmp_path):
    log = tmp_path / "fp32.log"

    def judged(rc, text):
        log.write_text(text)
        return train.judge_fp32_packed(harness.Done("fp32_packed", rc, 1.0, log)).verdict

    refused = ("error: data.packing=true on CUDA runs Transformer Engine's THD attention, which needs model.dtype=bf16"
               " ...; set model.dtype=bf16 or data.packing=false\n")
    assert judged(2, refused) == "PASS"
    assert judged(0, "step 1 loss 0.7\n") == "FAIL"  # ran: the check is gone
    assert judged(1, "Traceback (most recent call last):\nRuntimeError: No dot product attention backend\n") == "FAIL"
    assert judged(2, "Traceback (most recent call last):\n" + refused) == "FAIL"


def test_judge_shared_prompt_refused(tmp_path, monkeypatch):
    """The message the row looks for is the one ``run_data.shared_prompt`` raises under TE."""
    from rao_megatron.config import ConfigError, load_config
    from rao_megatron.training import run_data

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples/configs/rao_tiny.yaml",
                      ["data.shared_prompt=true"])
    monkeypatch.setattr(run_data, "transformer_engine_on_cuda", lambda: True)
    with pytest.raises(ConfigError) as e:
        run_data.shared_prompt(cfg)
    log = tmp_path / "shared.log"
    log.write_text(f"error: {e.value}\n")
    done = harness.Done("shared_prompt", 2, 1.0, log)
    assert train.judge_refused("r", done, train.SHARED_PROMPT_HINT, "x").verdict == "PASS"
    assert train.judge_refused("r", harness.Done("shared_prompt", 0, 1.0, log), train.SHARED_PROMPT_HINT,
                               "x").verdict == "FAIL"


def test_uneven_groups_pack_unevenly_over_two_ranks(tmp_path):
    # the row exists for unequal micro-batch counts per DP rank: the data must still give them
    from rao_megatron.config import load_config
    from rao_megatron.data import GroupBatcher
    from rao_megatron.training import run_data

    data = tmp_path / "uneven.jsonl"
    moe.write_uneven_groups(data)
    cfg = load_config(*_config_args(moe.uneven_args(tmp_path / "u", data)))
    groups = run_data.load_groups(cfg, run_data.load_run_tokenizer(cfg), cfg.loss.build().spec)
    settings = {k: v for k, v in run_data.packing_settings(cfg).items() if k != "equal_micro_batches"}
    counts = [len(GroupBatcher(groups.train, seq_length=cfg.data.max_length, pad_id=0, groups_per_micro_batch=1,
                               global_batch_groups=cfg.train.global_batch_groups, dp_rank=r, dp_size=2,
                               seed=cfg.data.seed, **settings).next_step()) for r in range(2)]
    assert counts[0] != counts[1], counts


def record(step, loss, mem=0.5, **kw):
    return {"step": step, "loss": loss, "gpu_max_mem_gib": mem, "tokens_per_s": 100.0, **kw}


def test_judge_training():
    falling = [record(i, 2.0 - 0.05 * i) for i in range(1, 21)]
    row = judge.judge_training("train/rao", falling, 20)
    assert row.verdict == "PASS" and row.figures["gpu_max_mem_gib"] == 0.5
    assert judge.judge_training("t", [record(i, 1.0 + 0.01 * i) for i in range(1, 21)], 20).verdict == "FAIL"
    nan = [*falling[:5], record(6, float("nan")), *falling[6:]]
    assert "non-finite loss at steps [6]" in judge.judge_training("t", nan, 20).reason
    no_mem = [{k: v for k, v in r.items() if k != "gpu_max_mem_gib"} for r in falling]
    assert "gpu_max_mem_gib" in judge.judge_training("t", no_mem, 20).reason
    assert "19 of 20 steps" in judge.judge_training("t", falling[:19], 20).reason
    assert judge.judge_training("t", [], 20).verdict == "FAIL"


def test_compare_losses():
    a = [record(1, 1.0), record(2, 0.9)]
    row = judge.compare_losses("x", a, a, [1, 2], rtol=1e-3, what="same")
    assert row.verdict == "PASS" and row.figures["bit_identical"]
    row = judge.compare_losses("x", [record(1, 1.0), record(2, 0.95)], a, [1, 2], rtol=1e-3, what="off")
    assert row.verdict == "FAIL" and row.figures["max_rel_diff"] > 0.05
    assert judge.compare_losses("x", a[:1], a, [1, 2], rtol=1e-3, what="short").verdict == "FAIL"
    assert judge.compare_losses("x", [record(1, 1.0005)], a, [1], rtol=1e-3, what="close").verdict == "PASS"


def test_gate_missing_skip_and_gpus():
    probe = {"deps": {k: {"ok": True} for k in harness.DEPS}, "gpus": 1}
    by_name = {c.name: c for c in cli.CHECKS}
    assert harness.gate(by_name["train"], probe) == []
    probe["deps"]["transformer_engine"] = {"ok": False, "error": "ModuleNotFoundError: No module named 'transformer_engine'"}
    (row,) = harness.gate(by_name["train"], probe)
    assert row.verdict == "MISSING" and "transformer_engine not importable" in row.reason
    assert "pip install -e '.[gpu]'" in row.reason
    probe["deps"]["vllm"] = {"ok": False, "error": "not installed"}
    assert harness.gate(by_name["vllm"], probe)[0].verdict == "SKIP"
    probe["deps"]["transformer_engine"] = {"ok": True}
    (row,) = harness.gate(by_name["multi_gpu"], probe)
    assert row.verdict == "SKIP" and row.reason == "needs 2 GPUs (found 1)"
    assert harness.gate(by_name["kernels"], probe) == []


def test_exit_code():
    row = harness.Row
    assert report.exit_code([row("a", "PASS"), row("b", "SKIP")]) == 0
    assert report.exit_code([row("a", "PASS"), row("b", "MISSING")]) == 1
    assert report.exit_code([row("a", "FAIL")]) == 1


def kernel_records(*, triton_slower: bool = True, mem: float = 2.0) -> list[dict]:
    recs = []
    for v in kernels.KERNEL_VOCABS:
        for precision in ("bf16", "fp8"):
            for impl in (["chunked", "triton"] if precision == "bf16" else ["chunked"]):
                recs.append({"kind": "accuracy", "V": v, "precision": precision, "impl": impl, "max_abs_diff": 0.01,
                             "mean_abs_diff": 0.001, "grad_hidden_rel_err": 0.003, "grad_weight_rel_err": 0.004})
            recs.append({"kind": "perf", "V": v, "precision": precision, "impl": "reference", "time_s": 0.1,
                         "extra_bytes": 16 * 2**30})
            recs.append({"kind": "perf", "V": v, "precision": precision, "impl": "chunked", "time_s": 0.12,
                         "extra_bytes": mem * 2**30})
        recs.append({"kind": "perf", "V": v, "precision": "bf16", "impl": "triton",
                     "time_s": 0.2 if triton_slower else 0.08, "extra_bytes": mem * 2**30})
        recs.append({"kind": "perf", "V": v, "precision": "bf16", "impl": "liger", "time_s": 0.1, "extra_bytes": 3 * 2**30})
    return recs


def test_kernel_rows():
    rows = {r.name: r for r in kernels.kernel_rows(kernel_records(), triton=True, hopper=True, liger=True)}
    assert [r.verdict for r in rows.values()] == ["PASS"] * 5
    assert "V=128256: chunked faster" in rows["kernels/triton_vs_chunked"].reason
    assert rows["kernels/triton_vs_chunked"].figures["V128256"]["triton_over_chunked"] == pytest.approx(0.2 / 0.12)
    assert rows["kernels/vs_naive"].figures["V64128/chunked"]["mem_vs_naive"] == pytest.approx(2 / 16)
    rows = {r.name: r for r in kernels.kernel_rows(kernel_records(triton_slower=False, mem=12.0), triton=True,
                                              hopper=False, liger=False)}
    assert "triton faster" in rows["kernels/triton_vs_chunked"].reason
    assert rows["kernels/vs_naive"].verdict == "FAIL"
    assert rows["kernels/fp8"].verdict == "SKIP" and "Hopper" in rows["kernels/fp8"].reason
    assert rows["kernels/liger"].verdict == "SKIP"
    rows = {r.name: r for r in kernels.kernel_rows(kernel_records(), triton=False, hopper=True, liger=True)}
    assert rows["kernels/triton_vs_chunked"].verdict == "MISSING"
    assert rows["kernels/accuracy_bf16"].verdict == "PASS"
    bad = kernel_records()
    bad[1]["max_abs_diff"] = 0.3  # triton, V=128256, bf16
    rows = {r.name: r for r in kernels.kernel_rows(bad, triton=True, hopper=True, liger=True)}
    assert rows["kernels/accuracy_bf16"].verdict == "FAIL" and "triton V=128256" in rows["kernels/accuracy_bf16"].reason
    crashed = [r for r in kernel_records() if r["impl"] != "triton"]
    rows = {r.name: r for r in kernels.kernel_rows(crashed, triton=True, hopper=True, liger=True)}
    assert rows["kernels/accuracy_bf16"].verdict == "FAIL" and "no result" in rows["kernels/accuracy_bf16"].reason


def test_judge_placement():
    good = {"parameters": 15, "cpu_parameters": [], "non_bf16_parameters": [], "cpu_buffers": [],
            "non_bf16_buffers": {}, "tensor_attributes": {"rotary_pos_emb.inv_freq": "torch.float32 on cuda:0"},
            "te_modules": ["TELayerNormColumnParallelLinear"], "sequence_parallel": False,
            "sequence_parallel_expected": False, "finite": True, "output_device": "cuda:0"}
    row = models.judge_placement("models/policy", good)
    assert row.verdict == "PASS" and "rotary_pos_emb.inv_freq" in row.reason
    assert models.judge_placement("m", {**good, "cpu_parameters": ["embedding.weight"]}).verdict == "FAIL"
    assert models.judge_placement("m", {**good, "non_bf16_parameters": ["x: torch.float32"]}).verdict == "FAIL"
    assert "local layer spec" in models.judge_placement("m", {**good, "te_modules": []}).reason
    assert models.judge_placement("m", {**good, "sequence_parallel": True}).verdict == "FAIL"
    assert models.judge_placement("m", {"error": "RuntimeError: boom"}).verdict == "FAIL"
    assert models.judge_scorer({"scores": [0.1, -0.2], "param_devices": ["cuda"], "param_dtypes": []}).verdict == "PASS"
    assert models.judge_scorer({"scores": [0.1, float("nan")], "param_devices": ["cuda"]}).verdict == "FAIL"
    assert models.judge_scorer({"scores": [0.1, 0.2], "param_devices": ["cpu"]}).verdict == "FAIL"


def test_parse_junit(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite name="pytest">'
                   '<testcase classname="tests.gpu.a" name="t1"/>'
                   '<testcase classname="tests.gpu.a" name="t2"><failure message="boom"/></testcase>'
                   '<testcase classname="tests.gpu.b" name="t3"><skipped message="needs vllm"/></testcase>'
                   '<testcase classname="tests.gpu.b" name="t4"><skipped message="needs vllm"/></testcase>'
                   "</testsuite></testsuites>")
    got = pytest_gpu.parse_junit(xml)
    assert got == {"passed": 1, "failed": ["tests.gpu.a::t2"], "skipped": 2, "skip_reasons": ["needs vllm"]}


def test_compare_safetensors_is_bitwise(tmp_path):
    import torch
    from safetensors.torch import save_file

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    tensors = {"w": torch.tensor([1.0, -0.0, float("nan")]), "e": torch.arange(6, dtype=torch.bfloat16).view(2, 3)}
    save_file(tensors, str(a / "model.safetensors"))
    save_file({"e": tensors["e"]}, str(b / "model-00001-of-00002.safetensors"))  # sharded differently: fine
    save_file({"w": tensors["w"].clone()}, str(b / "model-00002-of-00002.safetensors"))
    same = judge.compare_safetensors(a, b)
    assert same["identical"] and same["tensors"] == 2
    save_file({"w": torch.tensor([1.0, 0.0, float("nan")])}, str(b / "model-00002-of-00002.safetensors"))  # -0.0 -> 0.0
    diff = judge.compare_safetensors(a, b)
    assert not diff["identical"] and diff["different"][0].startswith("w:")


def test_last_error_prefers_the_one_line_error(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("progress\nTraceback (most recent call last):\nValueError: inner\nerror: config key 'x' bad\nbye\n")
    assert harness.last_error(log) == "error: config key 'x' bad"
    log.write_text("a\nRuntimeError: CUDA out of memory\n  something after\n")
    assert harness.last_error(log) == "RuntimeError: CUDA out of memory"
    assert harness.last_error(tmp_path / "missing.log") == "(no log)"


def test_report_json(tmp_path):
    rows = [harness.Row("train/rao", "PASS", "ok", 1.5, {"gpu_max_mem_gib": 0.4}), harness.Row("vllm", "SKIP", "no vllm")]
    written = report.write_report(tmp_path, {"cuda": True}, rows, 0.0, done=True)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["summary"] == written["summary"] == {"PASS": 1, "FAIL": 0, "SKIP": 1, "MISSING": 0}
    assert saved["rows"][0] == {"name": "train/rao", "verdict": "PASS", "reason": "ok", "seconds": 1.5,
                                "figures": {"gpu_max_mem_gib": 0.4}}


def test_judge_moe_forward():
    built = {"grouped_gemm": True, "dispatcher": "MoEAlltoAllTokenDispatcher"}
    good = {"bf16": {**built, "mean_abs_diff": 0.02}, "fp32": {**built, "mean_abs_diff": 1e-5}}
    assert moe.judge_moe_forward(good).verdict == "PASS"
    local = {**good, "bf16": {**good["bf16"], "grouped_gemm": False, "dispatcher": "MoEAllGatherTokenDispatcher"}}
    row = moe.judge_moe_forward(local)
    assert row.verdict == "FAIL" and "grouped GEMM" in row.reason and "all-to-all" in row.reason
    broken = {"bf16": {"error": "RuntimeError: boom"}}
    row = moe.judge_moe_forward(broken)
    assert row.verdict == "FAIL" and "boom" in row.reason and "fp32: not reached" in row.reason


def test_judge_lora():
    from tools.gpucheck.checks import lora

    good = {"te_layers": ["LayerNormLinear"], "adapters_local": 8, "adapters_te": 8, "max_lp_diff": 3e-4,
            "max_grad_rel_diff": 1e-3, "worst_grad": "decoder.layers.0.self_attention.linear_qkv.A"}
    assert lora.judge_lora("qwen3", good).verdict == "PASS"
    row = lora.judge_lora("qwen3", {**good, "te_layers": [], "max_grad_rel_diff": 0.5})
    assert row.verdict == "FAIL" and "not the TE spec" in row.reason and "linear_qkv.A" in row.reason
    row = lora.judge_lora("qwen3_moe", {**good, "adapters_te": 4})
    assert row.verdict == "FAIL" and "4 on the TE spec, 8 local" in row.reason
    assert lora.judge_lora("qwen3", {"error": "RuntimeError: boom"}).reason == "RuntimeError: boom"

