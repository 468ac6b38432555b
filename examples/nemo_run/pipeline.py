"""The whole RAO pipeline as one NeMo-Run experiment, locally or on a SLURM cluster.

Steps, in order (each a ``run.Script`` running one of the project's module CLIs):

    convert    python -m rao_megatron.cli.convert hf-to-megatron   HF SFT model -> Megatron (TP x PP)
    rm         python -m rao_megatron.cli.train train.task=rm       Bradley-Terry reward model (torchrun)
    annotate   python -m rao_megatron.cli.annotate                  rewards for every response
    reference  python -m rao_megatron.cli.precompute_reference      reference log-probs, once (torchrun)
    rao        python -m rao_megatron.cli.train                     the RAO policy run (torchrun)
    export     python -m rao_megatron.cli.convert megatron-to-hf    the result back to HF

A step that is left out is replaced by its input given on the command line: without ``convert`` the
runs start from ``--init-checkpoint`` (or the config's), without ``annotate`` the policy data must
already carry rewards, and so on.

On SLURM (``--executor slurm``) the training steps (rm, reference, rao) get whole nodes like the
sbatch scripts in slurm/: ``--exclusive``, ``--mem=0`` (all of each node's memory; ``--mem``),
``--gres=gpu:GPUS_PER_NODE``, a 24 h limit (``--time``), ``--signal=USR1@300`` (``--signal-lead-s``)
and ``--requeue``. NeMo-Run's batch script has no signal trap, so the signal goes to the job step
(torchrun on every node), not to the batch shell; torchrun (torch >= 2.10, PET_SIGNALS_TO_HANDLE) forwards
it to the workers, which checkpoint and exit 75; the batch script then requeues the job while its
restart count is below ``--max-requeues`` (it does so after any failure: it cannot tell a preemption
from a crash) and the requeued run resumes from the newest checkpoint. ``annotate`` with a reward model
gets one GPU (``--annotate-gpus``; rule rewards get none); ``convert`` and ``export`` get no GPU: the
converter runs on the CPU by design (it hides GPUs from its ranks), so they get ``--tool-mem`` (160G)
of memory and ``--tool-time`` (4 h) instead. Examples::

    # everything on this machine (torchrun), a dry run first
    python examples/nemo_run/pipeline.py --executor local --dryrun --hf-model /models/llama3-8b-sft \\
        --rm-data /data/pairs.jsonl --policy-data /data/prompts_responses.jsonl
    # the RAO step alone on a SLURM cluster over SSH, in an NGC container
    python examples/nemo_run/pipeline.py --executor slurm --tunnel ssh --ssh-host login.cluster \\
        --ssh-user me --remote-job-dir /lustre/me/nemo_run --repo-dir /lustre/me/rao_megatron \\
        --account acct --partition gpu --nodes 2 \\
        --container-image /lustre/me/rao_megatron.sqsh --steps rao --hf-model /models/llama3-8b-sft \\
        --init-checkpoint /ckpt/llama3-8b-sft-tp2 --policy-data /data/ann.jsonl
    # Qwen3-30B-A3B (mixture of experts): 2 nodes, TP4 x EP8 from the config (--ep overrides parallel.ep)
    python examples/nemo_run/pipeline.py --executor slurm --account acct --partition gpu --nodes 2 \
        --steps reference,rao,export --hf-model /models/Qwen3-30B-A3B --init-checkpoint /ckpt/qwen3-30b-a3b \
        --policy-data /data/ann.jsonl --rao-config examples/configs/rao_qwen3_30b_a3b.yaml
    # CPU smoke test: tiny model and data, 2 gloo processes (what the tests run)
    python examples/nemo_run/pipeline.py --executor local --steps rao --device cpu --gpus-per-node 2 \\
        --tp 2 --rao-config examples/configs/rao_tiny.yaml --override train.steps=3

The process exits 0 when every step SUCCEEDED, 1 otherwise (2 for a usage error).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS: tuple[str, ...] = ("convert", "rm", "annotate", "reference", "rao", "export")
#: steps launched with torchrun on nodes x gpus_per_node processes; the others are one process
DISTRIBUTED_STEPS = frozenset({"rm", "reference", "rao"})
#: what torchrun forwards to its workers (torch >= 2.10): SIGUSR1 is the time-limit / preemption signal
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


@dataclass
class PipelineSettings:
    """Everything the steps need; paths are made absolute (jobs do not run in the caller's directory)."""

    work_dir: Path = Path("runs/pipeline")
    steps: tuple[str, ...] = STEPS
    hf_model: str | None = None
    init_checkpoint: str | None = None
    rm_data: str | None = None
    policy_data: str | None = None
    rm_config: str = str(REPO_ROOT / "examples/configs/rm_llama3_8b.yaml")
    rao_config: str = str(REPO_ROOT / "examples/configs/rao_llama3_8b.yaml")
    reward_fn: str | None = None
    tp: int | None = None
    pp: int | None = None
    ep: int | None = None  # expert parallel (mixture-of-experts models)
    nodes: int = 1
    gpus_per_node: int = 8
    device: str = "cuda"
    overrides: list[str] = field(default_factory=list)
    #: this checkout as the jobs see it (``--repo-dir``); None: the same path as here. With an SSH tunnel
    #: the cluster's copy usually lives elsewhere: configs and the PYTHONPATH are rewritten to it
    repo_dir: str | None = None

    def __post_init__(self) -> None:
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise ValueError(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
        if not self.steps:
            raise ValueError("no steps selected")
        # keep the pipeline order whatever order they were given in
        self.steps = tuple(s for s in STEPS if s in self.steps)
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be cuda or cpu, got {self.device!r}")
        self.work_dir = _abs(self.work_dir)
        for name in ("hf_model", "init_checkpoint", "rm_data", "policy_data"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, str(_abs(value)))
        self.rm_config = str(_abs(self.rm_config))
        self.rao_config = str(_abs(self.rao_config))

    @property
    def job_root(self) -> Path:
        """The checkout's path inside the jobs."""
        return Path(self.repo_dir) if self.repo_dir else REPO_ROOT

    def job_path(self, path: str | Path) -> str:
        """``path`` as the jobs see it: files inside this checkout are moved to :attr:`job_root`."""
        p = Path(path)
        return str(self.job_root / p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)

    # ---- where each step reads and writes ----
    @property
    def megatron_init(self) -> str | None:
        return str(self.work_dir / "megatron_init") if "convert" in self.steps else self.init_checkpoint

    @property
    def rm_dir(self) -> Path:
        return self.work_dir / "rm"

    @property
    def annotated_data(self) -> str | None:
        return str(self.work_dir / "annotated.jsonl") if "annotate" in self.steps else self.policy_data

    @property
    def rao_dir(self) -> Path:
        return self.work_dir / "rao"

    @property
    def hf_out(self) -> Path:
        return self.work_dir / "hf_rao"


def _abs(path: str | Path) -> Path:
    """Absolute path: relative ones are read from the current directory (as any CLI does)."""
    return Path(path).expanduser().resolve()


#: config keys holding paths; the sbatch scripts run from the checkout, NeMo-Run jobs do not
PATH_KEYS = ("model.hf_config", "model.init_checkpoint", "model.tokenizer", "data.train_path",
             "data.eval_path", "data.reference_cache")


def config_path_overrides(config: str | Path, root: Path = REPO_ROOT) -> list[str]:
    """Overrides that make the config's relative paths absolute (relative to the checkout ``root``)."""
    import yaml

    data = yaml.safe_load(Path(config).read_text()) or {}
    out = []
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = (data.get(section) or {}).get(name)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            out.append(f"{key}={root / value}")
    return out


def _model_overrides(s: PipelineSettings) -> list[str]:
    out = []
    if s.hf_model:
        out.append(f"model.hf_config={s.hf_model}")
    if s.megatron_init:
        out.append(f"model.init_checkpoint={s.megatron_init}")
    if s.tp is not None:
        out.append(f"parallel.tp={s.tp}")
    if s.pp is not None:
        out.append(f"parallel.pp={s.pp}")
    if s.ep is not None:
        out.append(f"parallel.ep={s.ep}")
    # with cuda the training side refuses to start without a GPU instead of training on the CPU
    out.append(f"parallel.device={s.device}")
    if s.device == "cpu":
        out.append("parallel.backend=gloo")
    return out


def step_commands(s: PipelineSettings) -> dict[str, tuple[str, list[str]]]:
    """``{step: (module, args)}`` for the selected steps: the CLI each step runs."""
    cmds: dict[str, tuple[str, list[str]]] = {}
    for step in s.steps:
        if step == "convert":
            if not s.hf_model:
                raise ValueError("step 'convert' needs --hf-model")
            cmds[step] = ("rao_megatron.cli.convert",
                          ["hf-to-megatron", "--hf", s.hf_model, "--out", str(s.megatron_init),
                           "--tp", str(s.tp or 1), "--pp", str(s.pp or 1)])
        elif step == "rm":
            if not s.rm_data:
                raise ValueError("step 'rm' needs --rm-data")
            cmds[step] = ("rao_megatron.cli.train",
                          ["--config", s.job_path(s.rm_config), *config_path_overrides(s.rm_config, s.job_root),
                           "train.task=rm", "loss.name=bt",
                           f"data.train_path={s.rm_data}", f"train.output_dir={s.rm_dir}",
                           *_model_overrides(s), *s.overrides])
        elif step == "annotate":
            if not s.policy_data:
                raise ValueError("step 'annotate' needs --policy-data")
            scorer = (["--reward-fn", s.reward_fn] if s.reward_fn
                      else ["--reward-model", str(s.rm_dir / "checkpoints")])  # its `latest`
            cmds[step] = ("rao_megatron.cli.annotate",
                          ["--data", s.policy_data, "--out", str(s.annotated_data), *scorer])
        elif step in ("reference", "rao"):
            data = [f"data.train_path={s.annotated_data}"] if s.annotated_data else []
            module = "rao_megatron.cli.precompute_reference" if step == "reference" else "rao_megatron.cli.train"
            cmds[step] = (module, ["--config", s.job_path(s.rao_config),
                                   *config_path_overrides(s.rao_config, s.job_root),
                                   *data, f"train.output_dir={s.rao_dir}",
                                   *_model_overrides(s), *s.overrides])
        elif step == "export":
            cmds[step] = ("rao_megatron.cli.convert",
                          ["megatron-to-hf", "--megatron", str(s.rao_dir / "checkpoints"),  # its `latest`
                           "--out", str(s.hf_out)])
    return cmds


def job_env(s: PipelineSettings) -> dict[str, str]:
    """Environment of every step: the checkout importable, CPU-only settings for --device cpu, and
    torchrun told to forward SIGUSR1 (the preemption / time-limit signal) to its workers."""
    env = {"PYTHONPATH": str(s.job_root), "TORCHDYNAMO_DISABLE": "1", "PET_SIGNALS_TO_HANDLE": SIGNALS_TO_HANDLE}
    if s.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    else:
        env.update(CUDA_DEVICE_MAX_CONNECTIONS="1", TORCH_NCCL_ASYNC_ERROR_HANDLING="1")
    return env


@dataclass
class SlurmOptions:
    """sbatch settings. Training steps (rm, reference, rao) get whole nodes and the preemption settings;
    the one-process steps (convert, annotate, export) get ``tool_time`` / ``tool_mem`` and, for annotate
    with a reward model, ``annotate_gpus`` GPUs."""

    account: str | None = None
    partition: str | None = None
    #: time limit of the training steps (a requeued job gets it again)
    time: str = "24:00:00"
    #: all of each node's memory (``--mem=0``); None: the partition's default
    mem: str | None = "0"
    exclusive: bool = True
    #: ``--signal=USR1@signal_lead_s``: how long before the time limit the training is asked to checkpoint
    signal_lead_s: int = 300
    #: seconds torchrun gives its workers to checkpoint after the signal before SIGKILL (torch >= 2.12)
    shutdown_timeout_s: int = 240
    #: the batch script requeues a job that exited non-zero at most this many times
    max_requeues: int = 5
    tool_time: str = "04:00:00"
    #: the converter holds one model in memory (convert.sbatch asks for the same)
    tool_mem: str | None = "160G"
    annotate_gpus: int = 1
    cpus_per_task: int | None = None
    container_image: str | None = None
    container_mounts: list[str] = field(default_factory=list)
    tunnel: str = "local"
    ssh_host: str | None = None
    ssh_user: str | None = None
    remote_job_dir: str | None = None
    job_dir: str | None = None

    def __post_init__(self) -> None:
        if self.signal_lead_s <= 0 or self.shutdown_timeout_s <= 0:
            raise ValueError("--signal-lead-s and --shutdown-timeout must be positive")
        if self.shutdown_timeout_s >= self.signal_lead_s:
            raise ValueError(f"--shutdown-timeout ({self.shutdown_timeout_s} s) must be shorter than "
                             f"--signal-lead-s ({self.signal_lead_s} s): the workers must be done before the time limit")
        if self.max_requeues < 0 or self.annotate_gpus < 0:
            raise ValueError("--max-requeues and --annotate-gpus must be >= 0")


def step_gpus(s: PipelineSettings, step: str, slurm: SlurmOptions) -> int:
    """GPUs per node a step asks SLURM for: a node's worth for training, one for annotating with a model."""
    if s.device != "cuda":
        return 0
    if step in DISTRIBUTED_STEPS:
        return s.gpus_per_node
    if step == "annotate" and not s.reward_fn:
        return slurm.annotate_gpus
    return 0  # convert, export: the converter runs on the CPU


def make_executor(kind: str, s: PipelineSettings, step: str, slurm: SlurmOptions | None = None) -> Any:
    """A ``run.LocalExecutor`` or ``run.SlurmExecutor`` for one step (torchrun for distributed steps)."""
    import nemo_run as run

    distributed = step in DISTRIBUTED_STEPS
    env = job_env(s)
    if kind == "local":
        if distributed:
            return run.LocalExecutor(ntasks_per_node=s.gpus_per_node, launcher="torchrun", env_vars=env)
        return run.LocalExecutor(ntasks_per_node=1, env_vars=env)
    if kind != "slurm":
        raise ValueError(f"executor must be local or slurm, got {kind!r}")
    o = slurm or SlurmOptions()
    if o.tunnel == "ssh":
        if not (o.ssh_host and o.ssh_user and o.remote_job_dir):
            raise ValueError("--tunnel ssh needs --ssh-host, --ssh-user and --remote-job-dir")
        tunnel: Any = run.SSHTunnel(host=o.ssh_host, user=o.ssh_user, job_dir=o.remote_job_dir)
    else:
        tunnel = run.LocalTunnel(job_dir=o.job_dir or os.path.join(run.config.get_nemorun_home(), "experiments"))
    mounts = list(o.container_mounts)
    if o.container_image:
        mounts.append(f"{s.job_root}:{s.job_root}")
    gpus = step_gpus(s, step, o)
    # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: pass it on (as slurm/common.sh does)
    srun_args = [f"--cpus-per-task={o.cpus_per_task}"] if o.cpus_per_task else None
    common: dict[str, Any] = dict(
        account=o.account or "", partition=o.partition, ntasks_per_node=1, cpus_per_task=o.cpus_per_task,
        # --gres, not --gpus-per-node (cons_tres only), like the sbatch scripts
        gres=f"gpu:{gpus}" if gpus else None, container_image=o.container_image, container_mounts=mounts,
        srun_args=srun_args, tunnel=tunnel, packager=run.Packager())
    if not distributed:
        return run.SlurmExecutor(**common, time=o.tool_time, nodes=1, mem=o.tool_mem or None, env_vars=env)
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(o.shutdown_timeout_s)
    ex = run.SlurmExecutor(
        **common, time=o.time, nodes=s.nodes, mem=o.mem or None, exclusive=o.exclusive or None,
        # no "B:": NeMo-Run's batch shell has no trap to forward it; Slurm signals the job step (torchrun)
        signal=f"USR1@{o.signal_lead_s}", additional_parameters={"requeue": True},
        retries=o.max_requeues, env_vars=env)
    ex.launcher = "torchrun"
    ex.torchrun_nproc_per_node = s.gpus_per_node
    return ex


def build_experiment(s: PipelineSettings, executor: str, slurm: SlurmOptions | None = None,
                     name: str = "rao-pipeline") -> Any:
    """The ``run.Experiment`` with one task per selected step (run it inside ``with exp:``)."""
    import nemo_run as run

    exp = run.Experiment(name, log_level="WARN")
    with exp:
        for step, (module, args) in step_commands(s).items():
            script = run.Script(path=module, args=args, m=True, entrypoint="python")
            exp.add(script, executor=make_executor(executor, s, step, slurm), name=step)
    return exp


def run_experiment(exp: Any, dryrun: bool = False) -> dict[str, str]:
    """Dry-run (print the scripts) or run the steps one after the other; ``{step: final state}``."""
    with exp:
        if dryrun:
            exp.dryrun()
            return {job.id: "DRYRUN" for job in exp.jobs}
        exp.run(sequential=True, detach=False, tail_logs=False)
    # run() waited for every job (detach=False), so each job's state is final
    return {job.id: getattr(job.state, "name", str(job.state)) for job in exp.jobs}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python examples/nemo_run/pipeline.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--dryrun", action="store_true", help="print each step's script and submit nothing")
    p.add_argument("--name", default="rao-pipeline", help="experiment name")
    g = p.add_argument_group("model, data and parallelism")
    g.add_argument("--work-dir", default="runs/pipeline", help="every step's outputs go here")
    g.add_argument("--hf-model", help="HF directory of the SFT model (architecture, tokenizer, weights)")
    g.add_argument("--init-checkpoint", help="Megatron checkpoint to start from when 'convert' is not run")
    g.add_argument("--rm-data", help="preference pairs for the reward model")
    g.add_argument("--policy-data", help="prompts with responses: annotated by 'annotate', else used as is")
    g.add_argument("--reward-fn", help="module:function rule-based reward instead of the trained RM")
    g.add_argument("--rm-config", default=PipelineSettings.rm_config)
    g.add_argument("--rao-config", default=PipelineSettings.rao_config)
    g.add_argument("--tp", type=int)
    g.add_argument("--pp", type=int)
    g.add_argument("--ep", type=int, help="expert-parallel size (MoE models, e.g. Qwen3-30B-A3B)")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8, help="processes per node (CPU processes with --device cpu)")
    g.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    g.add_argument("--override", action="append", default=[], metavar="section.key=value",
                   help="config override for the rm, reference and rao steps (repeatable)")
    g = p.add_argument_group("SLURM executor")
    g.add_argument("--account")
    g.add_argument("--partition")
    d = SlurmOptions()
    g.add_argument("--time", default=d.time, help="time limit of the training steps (rm, reference, rao)")
    g.add_argument("--mem", default=d.mem, help="memory per node of the training steps (0: all of it; '': "
                                                 "the partition's default)")
    g.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=d.exclusive,
                   help="whole nodes for the training steps")
    g.add_argument("--signal-lead-s", type=int, default=d.signal_lead_s,
                   help="SIGUSR1 this many seconds before the time limit: the training checkpoints and requeues")
    g.add_argument("--shutdown-timeout", type=int, default=d.shutdown_timeout_s,
                   help="seconds torchrun gives the workers to checkpoint after the signal (torch >= 2.12)")
    g.add_argument("--max-requeues", type=int, default=d.max_requeues,
                   help="requeue a training job that exited non-zero at most this many times")
    g.add_argument("--tool-time", default=d.tool_time, help="time limit of convert, annotate and export")
    g.add_argument("--tool-mem", default=d.tool_mem, help="memory of convert, annotate and export")
    g.add_argument("--annotate-gpus", type=int, default=d.annotate_gpus,
                   help="GPUs for annotate with a reward model (none with --reward-fn or --device cpu)")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--container-image", help="pyxis/enroot image; none = run on the host")
    g.add_argument("--container-mounts", default="", help="comma-separated src:dst (the checkout is added)")
    g.add_argument("--tunnel", choices=("local", "ssh"), default="local",
                   help="local: submit with this machine's sbatch; ssh: through a login node")
    g.add_argument("--ssh-host")
    g.add_argument("--ssh-user")
    g.add_argument("--remote-job-dir")
    g.add_argument("--job-dir", help="LocalTunnel job directory (default $NEMORUN_HOME/experiments)")
    g.add_argument("--repo-dir", help="this checkout's path on the cluster, when it differs from here (SSH tunnel); "
                                      "configs inside the checkout and PYTHONPATH are taken from there")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = PipelineSettings(
            work_dir=Path(args.work_dir), steps=tuple(x.strip() for x in args.steps.split(",") if x.strip()),
            hf_model=args.hf_model, init_checkpoint=args.init_checkpoint, rm_data=args.rm_data,
            policy_data=args.policy_data, rm_config=args.rm_config, rao_config=args.rao_config,
            reward_fn=args.reward_fn, tp=args.tp, pp=args.pp, ep=args.ep, nodes=args.nodes,
            gpus_per_node=args.gpus_per_node, device=args.device, overrides=list(args.override),
            repo_dir=args.repo_dir)
        slurm = SlurmOptions(
            account=args.account, partition=args.partition, time=args.time, mem=args.mem or None,
            exclusive=args.exclusive, signal_lead_s=args.signal_lead_s, shutdown_timeout_s=args.shutdown_timeout,
            max_requeues=args.max_requeues, tool_time=args.tool_time, tool_mem=args.tool_mem or None,
            annotate_gpus=args.annotate_gpus, cpus_per_task=args.cpus_per_task,
            container_image=args.container_image,
            container_mounts=[m for m in args.container_mounts.split(",") if m],
            tunnel=args.tunnel, ssh_host=args.ssh_host, ssh_user=args.ssh_user,
            remote_job_dir=args.remote_job_dir, job_dir=args.job_dir)
        exp = build_experiment(settings, args.executor, slurm, name=args.name)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    states = run_experiment(exp, dryrun=args.dryrun)
    for step, state in states.items():
        print(f"{step}: {state}")
    ok = all(state in ("SUCCEEDED", "DRYRUN") for state in states.values())
    return 0 if ok else 1


__all__ = ["STEPS", "PipelineSettings", "SlurmOptions", "build_experiment", "main",
           "make_executor", "run_experiment", "step_commands", "step_gpus"]

if __name__ == "__main__":
    sys.exit(main())
