"""examples/nemo_run/pipeline.py: the experiment's steps, a dry run of the whole pipeline on both
executors, and the RAO step for real through LocalExecutor (torchrun, 2 gloo processes).
(The SlurmExecutor run is in test_slurm.py, beside the cluster it needs.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.e2e import REPO, job_env, read_metrics, require_nemo_run

STEPS = 3


def _pipeline() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rao_nemo_pipeline", REPO / "examples/nemo_run/pipeline.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_step_commands_chain_outputs_to_inputs(tmp_path: Path) -> None:
    p = _pipeline()
    s = p.PipelineSettings(work_dir=tmp_path, hf_model=str(tmp_path / "hf"), rm_data=str(tmp_path / "pairs.jsonl"),
                           policy_data=str(tmp_path / "resp.jsonl"), tp=2, pp=1)
    cmds = s and p.step_commands(s)
    assert list(cmds) == list(p.STEPS)
    assert cmds["convert"] == ("rao_megatron.cli.convert", ["hf-to-megatron", "--hf", str(tmp_path / "hf"), "--out",
                                                        str(tmp_path / "megatron_init"), "--tp", "2", "--pp", "1"])
    module, rm = cmds["rm"]
    assert module == "rao_megatron.cli.train" and {"train.task=rm", "loss.name=bt",
                                               f"model.init_checkpoint={tmp_path / 'megatron_init'}"} <= set(rm)
    assert cmds["annotate"][1][-2:] == ["--reward-model", str(tmp_path / "rm/checkpoints")]
    for step in ("reference", "rao"):
        assert f"data.train_path={tmp_path / 'annotated.jsonl'}" in cmds[step][1]
    assert cmds["reference"][0] == "rao_megatron.cli.precompute_reference"
    assert cmds["export"][1][:3] == ["megatron-to-hf", "--megatron", str(tmp_path / "rao/checkpoints")]


def test_steps_subset_uses_given_inputs_and_rejects_unknown(tmp_path: Path) -> None:
    p = _pipeline()
    s = p.PipelineSettings(work_dir=tmp_path, steps=("rao",), rao_config=str(REPO / "examples/configs/rao_tiny.yaml"),
                           device="cpu", tp=2)
    (module, args), = p.step_commands(s).values()
    # the config's relative data path is made absolute: NeMo-Run jobs do not run in the checkout
    assert f"data.train_path={REPO / 'examples/data/tiny_groups.jsonl'}" in args
    assert "parallel.backend=gloo" in args and not any(a.startswith("model.init_checkpoint") for a in args)
    with pytest.raises(ValueError, match="unknown step"):
        p.PipelineSettings(steps=("rao", "dance"))
    with pytest.raises(ValueError, match="needs --hf-model"):
        p.step_commands(p.PipelineSettings(steps=("convert",)))


def test_repo_dir_moves_checkout_paths_to_the_clusters_copy(tmp_path: Path) -> None:
    p = _pipeline()
    s = p.PipelineSettings(work_dir=tmp_path, steps=("rao",), rao_config=str(REPO / "examples/configs/rao_tiny.yaml"),
                           policy_data="/data/ann.jsonl", repo_dir="/lustre/me/rao_megatron")
    (_, args), = p.step_commands(s).values()
    assert args[:2] == ["--config", "/lustre/me/rao_megatron/examples/configs/rao_tiny.yaml"]
    assert "data.train_path=/data/ann.jsonl" in args  # given paths are kept as they are
    assert p.job_env(s)["PYTHONPATH"] == "/lustre/me/rao_megatron"
    assert not any(str(REPO) in a for a in args)


def _cli(*args: str, home: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "examples/nemo_run/pipeline.py", *args], cwd=REPO,
                          env=job_env(NEMORUN_HOME=str(home), COLUMNS="400"), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_dryrun_whole_pipeline(executor: str, tmp_path: Path) -> None:
    require_nemo_run()
    p = _cli("--executor", executor, "--dryrun", "--work-dir", str(tmp_path / "w"), "--hf-model", str(tmp_path),
             "--rm-data", "examples/data/tiny_groups.jsonl", "--policy-data", "examples/data/tiny_groups.jsonl",
             "--tp", "2", "--account", "ci", home=tmp_path / "home")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for step in ("convert", "rm", "annotate", "reference", "rao", "export"):
        assert f"{step}: DRYRUN" in p.stdout
    text = " ".join((p.stdout + p.stderr).split())
    for module in ("rao_megatron.cli.convert", "rao_megatron.cli.annotate", "rao_megatron.cli.precompute_reference",
                   "rao_megatron.cli.train"):
        assert module in text
    assert "torchrun" in text
    if executor == "slurm":
        scripts = _sbatch_flags_by_step(text)
        assert set(scripts) == {"convert", "rm", "annotate", "reference", "rao", "export"}, scripts
        for step in ("rm", "reference", "rao"):  # whole nodes, 24 h, checkpoint-and-requeue before the limit
            assert {"--exclusive", "--mem=0", "--gres=gpu:8", "--time=24:00:00", "--signal=USR1@300",
                    "--requeue"} <= scripts[step], (step, scripts[step])
        assert "--gres=gpu:1" in scripts["annotate"]  # the reward model scores on one GPU
        for step in ("convert", "export"):  # the converter runs on the CPU
            assert not any(f.startswith("--gres") for f in scripts[step]), scripts[step]
        for step in ("convert", "annotate", "export"):
            assert {"--mem=160G", "--time=04:00:00"} <= scripts[step] and "--exclusive" not in scripts[step]
            assert not any(f.startswith("--signal") for f in scripts[step])
        # torchrun forwards SIGUSR1 and gives the workers SHUTDOWN_TIMEOUT s; the batch script requeues
        assert text.count("export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1") == 6
        assert text.count("export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=240") == 3
        assert text.count("export TORCHX_MAX_RETRIES=5") == 3
        assert text.count("parallel.device=cuda") == 3
    assert not (tmp_path / "w").exists()  # nothing ran


def _sbatch_flags_by_step(text: str) -> dict[str, set[str]]:
    """``{step: {#SBATCH flags}}`` from a dry run's output (flags are sorted: each script starts at --account)."""
    import re

    flags = re.findall(r"#SBATCH (--[\w-]+(?:=\S+)?)", text)
    scripts: list[set[str]] = []
    for f in flags:
        if f.startswith("--account="):
            scripts.append(set())
        scripts[-1].add(f)
    out = {}
    for s in scripts:
        (name,) = [f for f in s if f.startswith("--job-name=")]
        out[name.rsplit(".", 1)[-1]] = s
    return out


def test_slurm_executor_settings_per_step(tmp_path: Path) -> None:
    """The SlurmExecutor each step gets: training steps whole nodes + preemption, tools what they use."""
    require_nemo_run()
    p = _pipeline()
    s = p.PipelineSettings(work_dir=tmp_path, hf_model=str(tmp_path), rm_data="x.jsonl", policy_data="y.jsonl",
                           nodes=2, gpus_per_node=8)
    o = p.SlurmOptions(account="acct", time="48:00:00", mem="500G", signal_lead_s=600, shutdown_timeout_s=500,
                       max_requeues=3, cpus_per_task=32, job_dir=str(tmp_path / "jobs"))
    rao = p.make_executor("slurm", s, "rao", o)
    assert (rao.nodes, rao.time, rao.mem, rao.exclusive, rao.gres) == (2, "48:00:00", "500G", True, "gpu:8")
    assert rao.gpus_per_node is None  # --gres, not --gpus-per-node (cons_tres only)
    assert rao.signal == "USR1@600" and rao.additional_parameters == {"requeue": True} and rao.retries == 3
    assert rao.launcher == "torchrun" and rao.torchrun_nproc_per_node == 8
    assert rao.env_vars["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "500"
    assert rao.env_vars["PET_SIGNALS_TO_HANDLE"].endswith(",SIGUSR1")
    assert rao.srun_args == ["--cpus-per-task=32"]  # srun no longer inherits it from sbatch (Slurm 22.05)
    ann = p.make_executor("slurm", s, "annotate", o)
    assert (ann.nodes, ann.gres, ann.mem, ann.time, ann.exclusive, ann.signal) == (1, "gpu:1", "160G", "04:00:00",
                                                                                   None, None)
    for step in ("convert", "export"):
        ex = p.make_executor("slurm", s, step, o)
        assert ex.gres is None and ex.nodes == 1 and ex.retries == 0
    # rule rewards and CPU runs ask for no GPU; the defaults
    rule = p.PipelineSettings(work_dir=tmp_path, reward_fn="m:f", policy_data="y.jsonl")
    assert p.make_executor("slurm", rule, "annotate", o).gres is None
    cpu = p.PipelineSettings(work_dir=tmp_path, device="cpu", gpus_per_node=2)
    d = p.make_executor("slurm", cpu, "rao", p.SlurmOptions(job_dir=str(tmp_path / "jobs")))
    assert d.gres is None and (d.time, d.mem, d.exclusive, d.signal, d.retries) == ("24:00:00", "0", True,
                                                                                      "USR1@300", 5)
    assert d.env_vars["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "240" and d.srun_args is None
    with pytest.raises(ValueError, match="must be shorter than"):
        p.SlurmOptions(signal_lead_s=300, shutdown_timeout_s=300)


def test_cli_usage_error_exits_2(tmp_path: Path) -> None:
    require_nemo_run()
    p = _cli("--steps", "convert", "--dryrun", home=tmp_path)
    assert p.returncode == 2 and "needs --hf-model" in p.stderr
    p = _cli("--steps", "rao", "--dryrun", "--signal-lead-s", "120", "--shutdown-timeout", "240", home=tmp_path)
    assert p.returncode == 2 and "--shutdown-timeout (240 s) must be shorter than --signal-lead-s (120 s)" in p.stderr


@pytest.mark.slow
def test_rao_step_through_local_executor(tmp_path: Path) -> None:
    require_nemo_run()
    work = tmp_path / "work"
    p = _cli("--executor", "local", "--steps", "rao", "--work-dir", str(work),
             "--rao-config", "examples/configs/rao_tiny.yaml", "--tp", "2", "--device", "cpu", "--gpus-per-node", "2",
             "--override", f"train.steps={STEPS}", "--override", "train.eval_every=0", home=tmp_path / "home",
             timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "rao: SUCCEEDED" in p.stdout
    records = read_metrics(work / "rao" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    latest = (work / "rao" / "checkpoints" / "latest").read_text().strip()
    assert (work / "rao" / "checkpoints" / latest).is_dir()
