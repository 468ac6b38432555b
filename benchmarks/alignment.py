"""RAO against the pairwise baselines on the quick-start task, fairly: one split, tuned per method, several seeds,
paired statistics; with rule rewards (0/1), with a Bradley–Terry reward model's continuous scores, and with the
best and worst answer of each group by those scores over several epochs.

    python benchmarks/alignment.py                                   # every setting, the whole protocol
    python benchmarks/alignment.py --settings rule --seeds 2 --grid-points 1 --steps 4    # a quick look
    python benchmarks/alignment.py --reuse benchmarks/results/alignment --results benchmarks/results/alignment
                                              # continue: finished runs are taken from there, new ones added
    python benchmarks/alignment.py --report --reuse benchmarks/results/alignment --out /tmp/a   # tables only

Protocol (docs/benchmarks.md has the figures, docs/rao.md the RAO settings):

1. Data: the quick-start's sampled groups (``make demo`` up to ``reference``: 105 arithmetic prompts × 4 answers
   of SmolLM2-135M-Instruct, rule rewards) are split by prompt, **before any filtering**, into a training split
   and a validation split (``--validation`` prompts); the quick-start's 40 held-out prompts stay untouched for
   the final figures. Every method trains on the same training-split file; the pairwise losses (DPO, SimPO,
   RPO) then drop its tied groups themselves (their count is reported), RAO and GRAO use every group unless
   a variant sets ``data.drop_tied``.
2. Settings: ``rule`` -- the exact-final-number rewards; ``rm`` -- a Bradley–Terry reward model trained with
   the project's own RM pipeline (``train.task=rm``) on the training split's preference pairs (its pair
   accuracy on the validation split is reported), which then re-scores every training answer with a
   continuous reward; the policies train on those scores and are judged by the rule. ``rm_k2`` -- closer to
   the paper's UltraFeedback setting: of each RM-scored group only its best and its worst answer by the RM's
   score (``best_worst``, like binarized UltraFeedback; the continuous scores kept), ``--k2-epochs`` passes
   over them at the lower learning rates of ``RM_K2_GRIDS`` (the schedule ends at a tenth of its rate).
   ``online`` -- the loop users of GRAO and online DPO run (``rao_megatron.cli.online``): from the same start,
   ``--online-rounds`` rounds in which the current policy samples ``--k`` answers (temperature ``--temperature``)
   to the next ``--online-prompts`` training-split prompts, the rule scores them and every group is trained once
   (a pairwise loss: the groups whose rewards differ), one run across rounds (Adam state and LR schedule kept);
   GRAO's y is the prompt's worked reference answer. 3 rounds × 32 prompts / 8 groups per step = the offline
   settings' 12 steps. The reference model is the start (computed on the fly). The report adds each round's
   mean sample reward and answer length.
3. Tuning: each method trains once per point of its grid with the first seed, and the point with the best
   accuracy on the validation prompts is kept (first point on ties). Every method's grid has the same size in
   a setting (``--grid-points N``: the first N of each). ``rule`` tunes on ``GRIDS`` (learning rate × β, RAO's
   normalisation / Z0, SimPO's γ). ``rm`` keeps the point each method's rule-setting grid chose (the same
   model, data, steps and validation metric; only the reward source differs) unless ``--rm-grid`` asks for a
   grid of its own on ``GRIDS``: a second grid is nine more runs, which this 2-core box cannot fit beside the
   seeds; ``online`` likewise keeps the rule grid's point unless ``--online-grid``. ``rm_k2`` always tunes on
   ``RM_K2_GRIDS``, and the checkpoint with it, cheaply: a grid run saves a
   checkpoint after every epoch and answers the validation prompts with each; the (point, epoch) with the best
   validation accuracy is kept (first point, then earliest epoch, on ties). The seed runs train the same
   schedule and are judged (held-out answers, displacement probe) at that epoch's checkpoint, so choosing
   the checkpoint costs an export and 100 validation answers per epoch of the grid runs, nothing per seed.
4. Seeds: the kept point trains with ``--seeds`` seeds; a seed sets the data order (``data.seed``), the
   initialisation of anything random (``train.seed``) and the sampling of the held-out answers. Every method
   sees the same seeds, so the comparison is paired.
5. Measured per run: held-out accuracy (K answers per prompt at temperature 0.8, exact-final-number rule);
   likelihood displacement: Δ_R(y_w) = log π_θ(y_w|x) − log π_ref(y_w|x) at the judged step for the preferred
   answer (best reward, first on ties) of every training-split group whose rewards differ in that setting --
   the same answers for every method -- as the mean and the share made less likely; training wall time; a
   small summary of the training log (``metric_summary``: the ``log_z`` and ``tied_share`` metrics of every
   step, the last step's ``ranking_accuracy``, ``tied_share``, ``displacement``...; an online run: each round's
   mean sample reward, answer length and informative groups), the held-out answers' mean length (characters: a
   collapse to bare digits shows there), so the figures quoted
   from the logs can be recomputed from ``result.json`` alone (runs stored before #29 lack it: "not kept").
   Informative group visits: how many of the run's steps × batch group visits went to a group whose rewards
   differ (``informative_visits``: from the per-step ``tied_share`` where the run kept it; every visit where the
   loss drops tied groups; else the expectation steps × batch × the informative share of the training groups).
6. Statistics, each a 95% interval: accuracy averaged over seeds and prompts (a) by a paired bootstrap over the
   held-out prompts, the seeds averaged (the same resampled prompts for every method), (b) by a two-level
   bootstrap over seeds × prompts (``two_level_bootstrap``: the seeds resampled, then the prompts, the same
   draws for every method), (c) as a t-interval over the per-seed accuracies; RAO minus each baseline with
   the same three, (c) being the paired t-interval of the per-seed differences. (a) ignores the variation
   between seeds, (b) and (c) include it; the tables quote (b), the interval table all three. Displacement
   share: mean ± 95% t-interval over seeds.

Variants (``VARIANTS``, only when named in ``--methods`` / ``--rm-methods`` / ``--rm-k2-methods``) are ablations:
a method's loss at the point (and, in ``rm_k2``, the checkpoint epoch) its base method has in that setting,
with overrides added and no grid of their own: ``rao_fixed_logz`` (log Z held at log_z0; the older spelling of
``loss.log_z=fixed``, kept so its stored runs keep their keys), ``rao_drop_tied`` (``data.drop_tied=true``:
RAO sees only the groups whose rewards differ, as the pairwise losses do -- equal exposure; in ``rm`` nothing
ties, so it equals RAO there), ``rao_sampled_logz`` (``loss.log_z=sampled``: each group's log Z the
log-mean-exp of its responses' r̃/β) and ``rao_sampled_prefix_logz`` (``loss.log_z=sampled_prefix``: that +
sg(Δ_P)); RAO itself is ``loss.log_z=prefix``, log_z0 + sg(Δ_P).

Nothing is reused silently: ``--out`` is emptied at the start unless ``--reuse DIR`` names a directory whose
finished runs (``result.json``, keyed by a hash of the whole run: data, start, overrides, seed, steps, the
``rm_k2`` schedule) are copied instead of recomputed. Every result records its command-line overrides and
resolved config. Writes ``<out>/alignment.json``, ``<out>/alignment.md``, ``<out>/alignment.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rao_megatron.cli.chain import fresh_dir, python_module, run_command, torchrun_module  # noqa: E402
from rao_megatron.rewards.synthetic import write_jsonl  # noqa: E402

CONFIG = REPO / "examples/configs/rao_smollm2_demo.yaml"
RULE = "rao_megatron.rewards.rule:exact_final_number"
PAIRWISE = {"dpo", "simpo", "rpo"}
#: per-method grids of the ``rule`` setting (and of ``rm`` with ``--rm-grid``), in order of preference on ties,
#: every one of the same size; --grid-points N keeps the first N of each
GRIDS: dict[str, list[dict[str, Any]]] = {
    "dpo": [{"train.lr": 1e-5, "loss.beta": 0.1}, {"train.lr": 1e-5, "loss.beta": 0.5},
            {"train.lr": 3e-6, "loss.beta": 0.1}],
    "rpo": [{"train.lr": 1e-5, "loss.beta": 0.1}, {"train.lr": 1e-5, "loss.beta": 0.5},
            {"train.lr": 3e-6, "loss.beta": 0.1}],
    "simpo": [{"train.lr": 1e-5, "loss.beta": 2.0, "loss.gamma": 1.0},
              {"train.lr": 1e-5, "loss.beta": 2.0, "loss.gamma": 0.5},
              {"train.lr": 3e-6, "loss.beta": 2.0, "loss.gamma": 1.0}],
    # the project's defaults (minmax rewards, log_z0 from the data), the paper's raw-reward setting, a smaller
    # learning rate (a fourth point, β 0.5, ran until #29 made every grid the same size: validation 0.67, not kept)
    "rao": [{"train.lr": 1e-5, "loss.beta": 0.1},
            {"train.lr": 1e-5, "loss.beta": 0.1, "loss.reward_normalization": "none", "loss.z0": 50.0},
            {"train.lr": 3e-6, "loss.beta": 0.1}],
    # GRAO (#30): β (the imitation weight) and the learning rate, at the paper's λ 0.6; worked reference answers
    "grao": [{"train.lr": 1e-5, "loss.beta": 0.5, "loss.lam": 0.6}, {"train.lr": 1e-5, "loss.beta": 0.1, "loss.lam": 0.6},
             {"train.lr": 3e-6, "loss.beta": 0.5, "loss.lam": 0.6}],
}


def _lower(lr: float, **rest: Any) -> dict[str, Any]:
    """A point of the ``rm_k2`` grids: the cosine schedule ends at a tenth of its learning rate."""
    return {"train.lr": lr, "train.min_lr": lr / 10, **rest}


#: the ``rm_k2`` setting's own grids (several epochs over best/worst pairs, so learning rates below the 12-step
#: settings' 1e-5), the same size for every method; each point's checkpoints are validated once per epoch
RM_K2_GRIDS: dict[str, list[dict[str, Any]]] = {
    "dpo": [_lower(3e-6, **{"loss.beta": 0.1}), _lower(3e-6, **{"loss.beta": 0.5}), _lower(1e-6, **{"loss.beta": 0.1})],
    "rpo": [_lower(3e-6, **{"loss.beta": 0.1}), _lower(3e-6, **{"loss.beta": 0.5}), _lower(1e-6, **{"loss.beta": 0.1})],
    "simpo": [_lower(3e-6, **{"loss.beta": 2.0, "loss.gamma": 1.0}), _lower(3e-6, **{"loss.beta": 2.0, "loss.gamma": 0.5}),
              _lower(1e-6, **{"loss.beta": 2.0, "loss.gamma": 1.0})],
    "rao": [_lower(3e-6, **{"loss.beta": 0.1}), _lower(3e-6, **{"loss.beta": 0.5}), _lower(1e-6, **{"loss.beta": 0.1})],
    "grao": [_lower(3e-6, **{"loss.beta": 0.5, "loss.lam": 0.6}), _lower(3e-6, **{"loss.beta": 0.1, "loss.lam": 0.6}),
             _lower(1e-6, **{"loss.beta": 0.5, "loss.lam": 0.6})],
}
#: variants of a method (ablations; run only when named): the method's loss at the point its base method has in
#: the setting (tuned there or kept from the rule grid), with these overrides added -- one thing changed, no grid
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # RAO with log Z held at log_z0 (no sg(Δ_P)): measures the log Z drift seen with the reward model's scores
    # (the older spelling of loss.log_z=fixed, kept so that its stored runs keep their keys)
    "rao_fixed_logz": ("rao", {"loss.prefix_consistency": False}),
    # equal exposure: RAO without the groups whose rewards all tie, as the pairwise losses train
    "rao_drop_tied": ("rao", {"data.drop_tied": True}),
    # each group's log Z = log-mean-exp over its responses of r̃/β (the responses being samples of the reference)
    "rao_sampled_logz": ("rao", {"loss.log_z": "sampled"}),
    # the same plus sg(Δ_P)
    "rao_sampled_prefix_logz": ("rao", {"loss.log_z": "sampled_prefix"}),
}
SETTING_METHODS = {"rule": "dpo,simpo,rpo,rao,grao", "rm": "dpo,rpo,rao", "rm_k2": "dpo,rpo,rao",
                   "online": "grao,rao,dpo"}


def loss_of(method: str) -> str:
    """The registry loss a method (or a variant) trains with."""
    return VARIANTS[method][0] if method in VARIANTS else method


def grids_of(setting: str) -> dict[str, list[dict[str, Any]]]:
    return RM_K2_GRIDS if setting == "rm_k2" else GRIDS


def drops_tied(method: str, point: dict[str, Any]) -> bool:
    """Whether a method's training drops the groups whose rewards all tie: ``data.drop_tied`` where its point
    sets it, else the loss's own rule (the pairwise losses drop them)."""
    v = point.get("data.drop_tied")
    return loss_of(method) in PAIRWISE if v is None else bool(v)


def k2_schedule(n_groups: int, batch: int, epochs: int) -> dict[str, int]:
    """``rm_k2``'s schedule: ``epochs`` passes over the groups, a checkpoint at the end of each."""
    per_epoch = math.ceil(n_groups / batch)
    return {"steps": per_epoch * epochs, "save_every": per_epoch}


def keep(args: argparse.Namespace, path: Path) -> None:
    """Copy a finished artefact (a run's result.json, the split, the RM scores, the report) into ``--results``,
    under the same relative path, so a stopped benchmark continues later with ``--reuse`` on that folder."""
    if args.results:
        dest = Path(args.results) / path.relative_to(args.out)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------

def task_prompts(path: Path) -> dict[str, dict]:
    """The demo's training prompts by id, each with the task's reference answer as the code writes it today (a
    worked answer, "7 times 6 = 42", since #30): a run directory made before that holds bare numbers, which
    GRAO would imitate. A prompt the task does not know, or one whose other fields differ, is an error."""
    from rao_megatron.tasks.arithmetic import all_problems

    task = {r["id"]: r for r in all_problems()}
    out, stale = {}, 0
    for r in read_jsonl(path):
        now = task.get(str(r["id"]))
        if now is None or {k: v for k, v in r.items() if k != "reference"} != {k: v for k, v in now.items()
                                                                                if k != "reference"}:
            raise SystemExit(f"alignment benchmark: {path}: prompt {r['id']!r} is not the arithmetic task's")
        stale += r.get("reference") != now["reference"]
        out[str(r["id"])] = now
    if stale:
        print(f"{path}: {stale} of {len(out)} reference answers predate the task's worked answers; using the "
              "task's", flush=True)
    return out


def split_groups(groups: list[dict], n_validation: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation) by prompt id, by a seeded shuffle of every group -- before any filtering."""
    order = sorted(groups, key=lambda g: str(g["id"]))
    random.Random(seed).shuffle(order)
    return order[n_validation:], order[:n_validation]


def differs(g: dict) -> bool:
    return max(g["rewards"]) > min(g["rewards"])


def preferred_probe(groups: list[dict]) -> list[dict]:
    """One single-answer row per group whose rewards differ: its best answer (first of the best on ties)."""
    out = []
    for g in groups:
        if differs(g):
            best = g["rewards"].index(max(g["rewards"]))
            out.append({"id": g["id"], "prompt": g["prompt"], "responses": [g["responses"][best]],
                        "rewards": [g["rewards"][best]]})
    return out


def best_worst(groups: list[dict]) -> list[dict]:
    """Setting ``rm_k2``: each group cut to two answers, its best and its worst by reward (first on ties), the
    rewards kept as they are (continuous scores stay continuous), like binarized UltraFeedback. A group
    whose rewards all tie keeps its first two answers; a group of one answer is left out."""
    out = []
    for g in groups:
        if len(g["responses"]) < 2:
            continue
        r = g["rewards"]
        best = r.index(max(r))
        worst = r.index(min(r)) if min(r) < max(r) else (1 if best == 0 else 0)
        out.append({**g, "responses": [g["responses"][best], g["responses"][worst]], "rewards": [r[best], r[worst]]})
    return out


def with_reference(groups: list[dict], prompts: dict[str, dict]) -> list[dict]:
    """GRAO's groups: the task's reference answer appended (reward 1 by the rule)."""
    from rao_megatron.rewards.rule import exact_final_number

    out = []
    for g in groups:
        ref = prompts[str(g["id"])]["reference"]
        out.append({**g, "reference": ref, "reference_reward": exact_final_number(g["prompt"], ref, g)})
    return out


# ------------------------------------------------------------------------------------------------------------
# one run: train, probe, answer
# ------------------------------------------------------------------------------------------------------------

def overrides_of(point: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in point.items()]


def response_logps(cache: Path) -> dict[int, float]:
    from safetensors.torch import load_file

    t = load_file(str(cache))
    return dict(zip(t["seq_keys"].tolist(), t["response_logps"].tolist()))


def forward_logps(args: argparse.Namespace, checkpoint: Path, data: Path, cache: Path) -> dict[int, float]:
    """log π(y | x) of every answer of ``data`` under ``checkpoint`` (forward only, the demo's layout)."""
    run_command(torchrun_module(args.procs, "rao_megatron.cli.precompute_reference", "--config", CONFIG,
                                f"model.init_checkpoint={checkpoint}", f"data.train_path={data}",
                                f"data.reference_cache={cache}", "data.eval_fraction=0",
                                f"train.output_dir={cache.parent}"))
    return response_logps(cache)


def score_answers(path: Path) -> dict[str, list[int]]:
    """Per prompt id: 1/0 per sampled answer by the exact-final-number rule."""
    from rao_megatron.rewards.rule import exact_final_number

    return {str(r["id"]): [int(exact_final_number(r["prompt"], y, r) >= 1.0) for y in r["responses"]]
            for r in read_jsonl(path)}


def answer(args: argparse.Namespace, model_dir: Path, prompts: Path, out: Path, seed: int) -> dict[str, list[int]]:
    run_command(python_module("rao_megatron.cli.generate", "--model", model_dir, "--prompts", prompts, "--out", out,
                              "--n", args.k, "--max-new-tokens", args.max_new_tokens, "--temperature",
                              args.temperature, "--seed", seed, "--backend", "hf", "--no-progress"))
    return score_answers(out)


#: metrics whose value at the last step a run keeps (absent ones are left out: a pairwise loss has no log Z)
LAST_STEP_METRICS = ("ranking_accuracy", "tied_share", "displacement", "tied/delta_r", "accuracy", "log_z",
                     # GRAO: its objective's three terms (the paper's loss decomposition), mean token log-probs
                     "objective/exploration", "objective/imitation", "objective/alignment", "logps_mean/reference",
                     "logps_mean/samples", "reward_mean")


def metric_summary(records: list[dict]) -> dict[str, Any]:
    """The small summary of a run's ``metrics.jsonl`` its result keeps: per step (the records with a ``step``)
    the ``log_z`` and ``tied_share`` trajectories (where the loss reports them), and ``last``: the
    ``LAST_STEP_METRICS`` of the last step. NaN (a metric with nothing to measure in a batch) becomes None."""
    def clean(x: Any) -> Any:
        return None if isinstance(x, float) and not math.isfinite(x) else x

    steps = [r for r in records if "step" in r and "loss" in r]
    out: dict[str, Any] = {"steps": len(steps)}
    for k in ("log_z", "tied_share"):
        if any(k in r for r in steps):
            out[k] = [clean(r.get(k)) for r in steps]
    if steps:
        out["last"] = {k: clean(steps[-1][k]) for k in LAST_STEP_METRICS if k in steps[-1]}
    return out


def answer_length(path: Path) -> float:
    """Mean length (characters) of the sampled answers in a generated file: a collapse to bare digits shows here."""
    lengths = [len(y) for r in read_jsonl(path) for y in r["responses"]]
    return sum(lengths) / len(lengths)


def accuracy(scores: dict[str, list[int]]) -> float:
    flat = [x for v in scores.values() for x in v]
    return sum(flat) / len(flat)


class Runner:
    """Runs (or takes from ``--reuse``) one training run and its measurements, keyed by everything it depends on."""

    def __init__(self, args: argparse.Namespace, start_ckpt: Path, reference_cache: Path) -> None:
        self.args, self.start_ckpt, self.reference_cache = args, start_ckpt, reference_cache
        self.reuse = {}
        if args.reuse:
            for f in Path(args.reuse).rglob("result.json"):
                r = json.loads(f.read_text())
                self.reuse[r.get("key")] = r

    def key(self, **parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def run(self, *, setting: str, method: str, point: dict[str, Any], seed: int, data: Path, eval_name: str,
            eval_prompts: Path, probe: tuple[Path, dict[int, float]] | None,
            schedule: dict[str, Any] | None = None, online: dict[str, int] | None = None) -> dict | None:
        """``probe``: the preferred answers and their start log-probs, measured at the (last) evaluated step (or
        None). ``schedule`` (setting ``rm_k2``): ``{"steps", "save_every", "eval_steps"}`` -- train ``steps``,
        save a checkpoint every ``save_every`` steps and answer ``eval_prompts`` with each checkpoint of
        ``eval_steps`` (the result's ``by_step``; its ``scores`` / ``accuracy`` are the last one's); None: the
        run's ``--steps``, answered at the end. ``online`` (setting ``online``): ``{"rounds", "prompts_per_round"}``
        -- ``data`` is then a prompt file and the run is ``rao_megatron.cli.online`` from the start (the policy
        samples ``--k`` answers per prompt at ``--temperature``, the rule scores them, every group is trained
        once per round), answered with its last round's policy."""
        args = self.args
        ov = [f"loss.name={loss_of(method)}", *overrides_of(point)]
        steps = schedule["steps"] if schedule else args.steps
        extra = {"schedule": schedule} if schedule else {"online": online} if online else {}
        key = self.key(setting=setting, method=method, overrides=ov, seed=seed, steps=None if online else steps,
                       batch=args.global_batch_groups, data=file_hash(data), start=args.start_id,
                       eval=file_hash(eval_prompts), k=args.k, temperature=args.temperature,
                       max_new_tokens=args.max_new_tokens, probe=probe and file_hash(probe[0]),
                       **extra)  # absent: the earlier runs keep their keys
        tag = f"{method}-{self.key(ov=ov, **extra)[:8]}-s{seed}-{eval_name}"
        out = args.out / "runs" / setting / tag
        result_file = out / "result.json"
        if key in self.reuse:
            out.mkdir(parents=True, exist_ok=True)
            result_file.write_text(json.dumps(self.reuse[key], indent=1) + "\n")
            keep(args, result_file)
            print(f"reused {setting}/{tag} from {args.reuse}", flush=True)
            return self.reuse[key]
        if result_file.is_file() and json.loads(result_file.read_text()).get("key") == key:
            return json.loads(result_file.read_text())  # finished earlier in this same --out
        if args.report:
            return None  # --report: what is finished only
        print(f"\n=== {setting}: {tag} ({' '.join(ov)}) ===", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        common = [*ov, "data.eval_fraction=0", f"data.seed={seed}",
                  f"train.global_batch_groups={args.global_batch_groups}", "train.eval_every=0"]
        t0 = time.time()
        if online:
            online_dir = fresh_dir(out / "online")
            train_dir = online_dir / "train"
            # the reference is the start model, computed on the fly (each round's samples are new sequences)
            overrides = [*common, "train.reference=on_the_fly", "checkpoint.keep_last=1"]
            run_command(python_module(
                "rao_megatron.cli.online", "--config", CONFIG, "--prompts", data, "--hf", REPO / ".cache/smollm2-hf",
                "--start", self.start_ckpt, "--out", online_dir, "--rounds", online["rounds"],
                "--prompts-per-round", online["prompts_per_round"], "--reward-fn", RULE, "--n", args.k,
                "--max-new-tokens", args.max_new_tokens, "--temperature", args.temperature, "--backend", "hf",
                "--procs", args.procs, "--seed", seed, "--train-seed", seed, *overrides))
            rounds = read_jsonl(online_dir / "rounds.jsonl")
            steps = sum(r["steps"] for r in rounds)
        else:
            train_dir = fresh_dir(out / "train")
            overrides = [*common, f"model.init_checkpoint={self.start_ckpt}", f"data.train_path={data}",
                         f"data.reference_cache={self.reference_cache}", f"train.seed={seed}", f"train.steps={steps}",
                         f"train.output_dir={train_dir}"]
            if schedule:
                overrides += [f"checkpoint.save_every={schedule['save_every']}",
                              f"checkpoint.keep_last={steps // schedule['save_every']}"]
            else:
                overrides += ["checkpoint.keep_last=1"]
            run_command(torchrun_module(args.procs, "rao_megatron.cli.train", "--config", CONFIG, *overrides))
        train_seconds = time.time() - t0
        import yaml

        resolved = yaml.safe_load((train_dir / "config.yaml").read_text())
        metrics = read_jsonl(train_dir / "metrics.jsonl")
        result: dict[str, Any] = {"key": key, "setting": setting, "method": method, "point": point, "seed": seed,
                                  "overrides": overrides, "resolved_config": resolved, "eval": eval_name,
                                  "train_seconds": round(train_seconds, 1),
                                  "final_loss": next((m["loss"] for m in reversed(metrics) if "loss" in m), None),
                                  "metrics_summary": metric_summary(metrics)}
        ckpt = train_dir / "checkpoints"
        eval_steps = schedule["eval_steps"] if schedule else [steps]
        # the checkpoint of a step: training/checkpoint.py's step_dir (not imported: it loads Megatron)
        at = {s: ckpt / f"step_{s:07d}" if schedule else ckpt for s in eval_steps}
        if online:
            result["rounds"] = [{**{k: v for k, v in r.items() if k != "checkpoint"}, "informative_groups": sum(
                differs(g) for g in read_jsonl(online_dir / f"round_{r['round']}" / "train_groups.jsonl"))}
                for r in rounds]
            at = {steps: ckpt if steps else self.start_ckpt}
        if probe:
            now = forward_logps(args, at[eval_steps[-1]], probe[0], out / "probe_end.safetensors")
            deltas = [now[k] - probe[1][k] for k in probe[1]]
            result["probe"] = {"step": eval_steps[-1], "answers": len(deltas),
                               "mean_delta_r": sum(deltas) / len(deltas),
                               "share_lowered": sum(d < 0 for d in deltas) / len(deltas)}
        hf = out / "hf"
        for s in eval_steps:
            if online:  # the last round's export (or the start when no round trained)
                hf = (online_dir / "final_hf").resolve()
            else:
                fresh_dir(hf)
                run_command(python_module("rao_megatron.cli.convert", "megatron-to-hf", "--megatron", at[s], "--out",
                                          hf, "--no-progress"))
            name = f"{eval_name}_answers.jsonl" if not schedule else f"{eval_name}_answers_step{s}.jsonl"
            scores = answer(args, hf, eval_prompts, out / name, seed)
            result.update({"scores": scores, "accuracy": accuracy(scores), "answer_length": answer_length(out / name)})
            if schedule:
                result["eval_step"] = s
                result.setdefault("by_step", {})[str(s)] = {"accuracy": accuracy(scores), "scores": scores}
        result_file.write_text(json.dumps(result, indent=1) + "\n")
        keep(args, result_file)
        if not args.keep:
            for path in (out / "hf", ckpt, *((out / "online").glob("round_*/hf") if online else ())):
                shutil.rmtree(path, ignore_errors=True)
        return result


# ------------------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------------------

def per_prompt(runs: list[dict]) -> dict[str, float]:
    """Accuracy per held-out prompt, averaged over the runs (seeds)."""
    ids = sorted(runs[0]["scores"])
    return {i: sum(sum(r["scores"][i]) / len(r["scores"][i]) for r in runs) / len(runs) for i in ids}


def per_seed_prompt(runs: list[dict]) -> dict[int, dict[str, float]]:
    """Accuracy per seed and held-out prompt (the share of its K answers that are right)."""
    return {r["seed"]: {i: sum(v) / len(v) for i, v in r["scores"].items()} for r in runs}


def bootstrap(per_method: dict[str, dict[str, float]], reps: int, seed: int) -> dict[str, list[float]]:
    """Accuracy of every method over ``reps`` resamples of the prompts (the same resamples for every method)."""
    ids = sorted(next(iter(per_method.values())))
    rng = random.Random(seed)
    draws: dict[str, list[float]] = {m: [] for m in per_method}
    for _ in range(reps):
        sample = [ids[rng.randrange(len(ids))] for _ in ids]
        for m, acc in per_method.items():
            draws[m].append(sum(acc[i] for i in sample) / len(sample))
    return draws


def two_level_bootstrap(per_method: dict[str, dict[int, dict[str, float]]], reps: int, seed: int,
                        nested: bool = False) -> dict[str, list[float]]:
    """Accuracy of every method over ``reps`` two-level resamples: the seeds with replacement, then the prompts
    with replacement -- one prompt resample for all the drawn seeds (the default: every seed answers the same
    held-out prompts, so seeds and prompts are crossed, and a prompt's difficulty is shared by every seed), or
    with ``nested`` a new prompt resample within each drawn seed (right where each seed had prompts of its
    own; on crossed prompts it averages the prompt effect away and comes out narrower than resampling the
    prompts alone). The same drawn seeds and prompts serve every method, so differences of the draws stay
    paired. Every method must have the same seeds and prompts (``per_method``: method -> seed -> prompt ->
    accuracy)."""
    first = next(iter(per_method.values()))
    seeds = sorted(first)
    ids = sorted(first[seeds[0]])
    for m, acc in per_method.items():
        if sorted(acc) != seeds or any(sorted(acc[s]) != ids for s in seeds):
            raise ValueError(f"two_level_bootstrap: {m!r} has other seeds or prompts than {seeds}")
    rng = random.Random(seed)
    draws: dict[str, list[float]] = {m: [] for m in per_method}
    n = len(seeds) * len(ids)
    for _ in range(reps):
        drawn = [seeds[rng.randrange(len(seeds))] for _ in seeds]
        shared = None if nested else [ids[rng.randrange(len(ids))] for _ in ids]
        picks = [(s, shared or [ids[rng.randrange(len(ids))] for _ in ids]) for s in drawn]
        for m, acc in per_method.items():
            draws[m].append(sum(acc[s][i] for s, sample in picks for i in sample) / n)
    return draws


def interval(xs: list[float]) -> tuple[float, float]:
    s = sorted(xs)
    return s[int(0.025 * (len(s) - 1))], s[int(math.ceil(0.975 * (len(s) - 1)))]


#: two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval) over seeds."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, T95.get(len(xs) - 1, 1.96) * sd / math.sqrt(len(xs))


def t_interval(xs: list[float]) -> list[float]:
    """The 95% t-interval over seeds, [mean − h, mean + h] (NaN bounds with one seed)."""
    m, h = mean_ci(xs)
    return [m - h, m + h]


def informative_visits(run: dict, *, groups: int, differing: int, drops_tied: bool, steps: int,
                       batch: int) -> tuple[float, str]:
    """``(visits, how)``: how many of a run's ``steps × batch`` group visits were to a group whose rewards
    differ. ``measured``: from the run's per-step ``tied_share`` (its metric summary; RAO reports it);
    ``all``: the loss drops tied groups (pairwise losses, ``data.drop_tied``), so every visit is informative;
    ``expected``: steps × batch × the informative share of the training groups (runs kept without a summary)."""
    steps = (run.get("resolved_config") or {}).get("train", {}).get("steps", steps)
    batch = (run.get("resolved_config") or {}).get("train", {}).get("global_batch_groups", batch)
    shares = (run.get("metrics_summary") or {}).get("tied_share")
    if shares and len(shares) == steps and all(x is not None for x in shares):
        return sum(batch * (1.0 - x) for x in shares), "measured"
    if drops_tied:
        return float(steps * batch), "all"
    return steps * batch * differing / groups, "expected"


def summarise(setting: str, finals: dict[str, list[dict]], tuned: dict[str, dict], groups_used: dict[str, int],
              reps: int, visits: dict[str, tuple[float, str]] | None = None) -> dict:
    """Per method: accuracy with three 95% intervals -- ``ci`` (paired bootstrap over held-out prompts, the
    seeds averaged), ``ci_two_level`` (seeds, then prompts within each seed) and ``ci_t`` (t over the per-seed
    accuracies) -- and, against RAO, the same three for RAO − method (``ci_t``: the paired t-interval of the
    per-seed differences over the seeds both have)."""
    acc = {m: per_prompt(runs) for m, runs in finals.items()}
    draws = bootstrap(acc, reps, seed=0)
    cells = {m: per_seed_prompt(runs) for m, runs in finals.items()}
    two_level: dict[tuple[int, ...], dict[str, list[float]]] = {}

    def two_level_draws(seeds: tuple[int, ...]) -> dict[str, list[float]]:
        """The draws of every method that has ``seeds``, restricted to them (the same resamples for all)."""
        if seeds not in two_level:
            two_level[seeds] = two_level_bootstrap({m: {s: c[s] for s in seeds} for m, c in cells.items()
                                                    if set(seeds) <= set(c)}, reps, seed=0)
        return two_level[seeds]

    rows = {}
    for m, runs in finals.items():
        mean = sum(acc[m].values()) / len(acc[m])
        lo, hi = interval(draws[m])
        seeds = tuple(sorted(cells[m]))
        row = {"accuracy": mean, "ci": [lo, hi], "ci_two_level": list(interval(two_level_draws(seeds)[m])),
               "ci_t": t_interval([r["accuracy"] for r in runs]), "seeds": [r["seed"] for r in runs],
               "per_seed_accuracy": [r["accuracy"] for r in runs], "point": tuned[m]["point"],
               "validation": tuned[m]["validation"], "tuned_in": tuned[m]["tuned_in"],
               "groups_used": groups_used[m],
               "train_seconds": sum(r["train_seconds"] for r in runs) / len(runs)}
        if "eval_step" in tuned[m]:
            row["eval_step"] = tuned[m]["eval_step"]
        if all("answer_length" in r for r in runs):
            row["answer_length"] = sum(r["answer_length"] for r in runs) / len(runs)
        if all("rounds" in r for r in runs):  # online: each round's mean sample reward and length over the seeds
            row["rounds"] = [{k: sum(r["rounds"][i][k] for r in runs) / len(runs)
                              for k in ("sample_reward", "answer_length", "steps")}
                             for i in range(min(len(r["rounds"]) for r in runs))]
        if visits and m in visits:
            row["informative_visits"], row["informative_visits_how"] = visits[m]
        if all("probe" in r for r in runs):
            share = mean_ci([r["probe"]["share_lowered"] for r in runs])
            row["share_lowered"] = {"mean": share[0], "ci95": share[1]}
            row["mean_delta_r"] = mean_ci([r["probe"]["mean_delta_r"] for r in runs])[0]
        summaries = [r["metrics_summary"] for r in runs if r.get("metrics_summary")]
        if summaries:
            row["last_step"] = {"runs": len(summaries)}
            for k in ("ranking_accuracy", "tied_share"):
                xs = [s["last"][k] for s in summaries if s.get("last", {}).get(k) is not None]
                if xs:
                    row["last_step"][k] = [min(xs), max(xs)]
            moves = [s["log_z"][-1] - s["log_z"][0] for s in summaries
                     if s.get("log_z") and s["log_z"][0] is not None and s["log_z"][-1] is not None]
            if moves:
                row["last_step"]["log_z_move"] = [min(moves), max(moves)]
        if m != "rao" and "rao" in finals:
            mine = {r["seed"]: r for r in runs}
            theirs = {r["seed"]: r for r in finals["rao"]}
            common = tuple(sorted(set(mine) & set(theirs)))
            if common:  # paired on the seeds both have (all of them, once every run is in)
                if set(common) == set(mine) == set(theirs):
                    pair, pair_draws = acc, draws
                else:  # the same prompt resamples, on the seeds in common only
                    pair = {k: per_prompt([d[s] for s in common]) for k, d in (("rao", theirs), (m, mine))}
                    pair_draws = bootstrap(pair, reps, seed=0)
                diff = [a - b for a, b in zip(pair_draws["rao"], pair_draws[m])]
                per_seed = [theirs[s]["accuracy"] - mine[s]["accuracy"] for s in common]
                d2 = two_level_draws(common)
                diff2 = [a - b for a, b in zip(d2["rao"], d2[m])]
                row["rao_minus_this"] = {
                    "mean": sum(pair["rao"].values()) / len(pair["rao"]) - sum(pair[m].values()) / len(pair[m]),
                    "ci": list(interval(diff)), "rao_share_of_resamples_ahead": sum(d > 0 for d in diff) / len(diff),
                    "seeds": list(common), "per_seed": per_seed, "seeds_rao_ahead": sum(d > 0 for d in per_seed),
                    "ci_two_level": list(interval(diff2)),
                    "rao_share_of_two_level_resamples_ahead": sum(d > 0 for d in diff2) / len(diff2),
                    "ci_t": t_interval(per_seed)}
        rows[m] = row
    return {"setting": setting, "methods": rows}


def _ci(ci: list[float] | None, fmt: str = ".3f") -> str:
    if not ci or any(math.isnan(x) for x in ci):
        return "—"
    return f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def table(summary: dict) -> str:
    """The setting's main table: accuracy and RAO − method with the two-level (seeds × prompts) interval."""
    lines = ["| method | seeds | kept point (validation accuracy) | groups trained on | informative group visits | "
             "held-out accuracy [95% CI, seeds × prompts] | answer length (chars) | RAO − method [95% CI, seeds × "
             "prompts] | y_w made less likely (mean ± 95% CI over seeds) | mean Δ_R(y_w) | last step: ranking "
             "accuracy; tied share; log Z moved | train time / run |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in summary["methods"].items():
        point = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in r["point"].items())
        diff = r.get("rao_minus_this")
        diff_s = f"{diff['mean']:+.3f} {_ci(diff.get('ci_two_level'), '+.3f')}" if diff else "—"
        if diff and len(diff["seeds"]) < len(r["seeds"]) or diff and len(diff["seeds"]) < len(
                summary["methods"].get("rao", {}).get("seeds", [])):
            n = len(diff["seeds"])
            diff_s += f" ({n} common seed{'s' if n > 1 else ''})"
        share = r.get("share_lowered")
        share_s = "—" if not share else f"{100 * share['mean']:.0f}%" + (
            "" if math.isnan(share["ci95"]) else f" ± {100 * share['ci95']:.0f}")
        dr = f"{r['mean_delta_r']:+.2f}" if "mean_delta_r" in r else "—"
        length_s = f"{r['answer_length']:.1f}" if "answer_length" in r else "— (not kept)"
        where = "" if r.get("tuned_in", summary["setting"]) == summary["setting"] else f", {r['tuned_in']} grid"
        where += f", step {r['eval_step']}" if "eval_step" in r else ""
        whose = f"{VARIANTS[m][0]}'s " if m in VARIANTS else ""  # a variant is not validated on its own
        visits = "—" if "informative_visits" not in r else \
            f"{r['informative_visits']:.0f} ({r['informative_visits_how']})"
        last = r.get("last_step")
        if last:
            fmt = {"ranking_accuracy": ".2f", "tied_share": ".2f", "log_z_move": "+.1f"}
            parts = [(f"{a:{f}}" if f"{a:{f}}" == f"{b:{f}}" else f"{a:{f}} to {b:{f}}") for k, f in fmt.items()
                     for a, b in [last.get(k, (None, None))] if a is not None]
            last_s = "; ".join(parts) + ("" if last["runs"] == len(r["seeds"]) else f" ({last['runs']} runs)")
        else:
            last_s = "— (not kept)"
        lines.append(f"| {m} | {len(r['seeds'])} | {point} ({whose}{r['validation']:.3f}{where}) | {r['groups_used']} | "
                     f"{visits} | {r['accuracy']:.3f} {_ci(r.get('ci_two_level'))} | {length_s} | "
                     f"{diff_s} | {share_s} | {dr} | "
                     f"{last_s} | {r['train_seconds']:.0f} s |")
    return "\n".join(lines)


def interval_table(summary: dict) -> str:
    """Every interval of the setting side by side: over prompts (seeds averaged), over seeds × prompts
    (two-level bootstrap) and the t-interval over seeds; for accuracy and for RAO − method (paired)."""
    lines = ["| method | accuracy | over prompts | seeds × prompts | t over seeds | RAO − method | over prompts | "
             "seeds × prompts | paired t over seeds | RAO ahead on seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in summary["methods"].items():
        d = r.get("rao_minus_this")
        if d:
            ahead = f"{d['seeds_rao_ahead']} of {len(d['seeds'])}"
            d_s = (f"{d['mean']:+.3f} | {_ci(d['ci'], '+.3f')} | {_ci(d.get('ci_two_level'), '+.3f')} | "
                   f"{_ci(d.get('ci_t'), '+.3f')} | {ahead}")
        else:
            d_s = "— | — | — | — | —"
        lines.append(f"| {m} | {r['accuracy']:.3f} | {_ci(r['ci'])} | {_ci(r.get('ci_two_level'))} | "
                     f"{_ci(r.get('ci_t'))} | {d_s} |")
    return "\n".join(lines)


def rounds_table(summary: dict) -> str:
    """Online setting: each round's mean reward and length of the policy's own samples (means over the seeds)."""
    rows = {m: r["rounds"] for m, r in summary["methods"].items() if r.get("rounds")}
    if not rows:
        return ""
    n = max(len(x) for x in rows.values())
    lines = ["| method | " + " | ".join(f"round {i + 1}: sample reward, length" for i in range(n)) + " |",
             "|---|" + "---|" * n]
    for m, rounds in rows.items():
        cells = [f"{x['sample_reward']:.3f}, {x['answer_length']:.1f}" for x in rounds] + ["—"] * (n - len(rounds))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summaries: list[dict], start: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [s for s in summaries if s["methods"]]  # a setting with no finished run takes no place
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(summaries))
    order = list(dict.fromkeys(m for s in summaries for m in s["methods"]))  # one x position per method
    ticks = [i + width * (len(summaries) - 1) / 2 for i in range(len(order))]
    for k, s in enumerate(summaries):
        names = list(s["methods"])
        xs = [order.index(m) + k * width for m in names]
        acc = [s["methods"][m]["accuracy"] for m in names]
        ci = [s["methods"][m].get("ci_two_level") or s["methods"][m]["ci"] for m in names]
        err = [[max(0.0, a - c[0]) for c, a in zip(ci, acc)], [max(0.0, c[1] - a) for c, a in zip(ci, acc)]]
        axes[0].bar(xs, acc, width, yerr=err, capsize=3, label=f"{s['setting']} rewards")
        share = [100 * s["methods"][m].get("share_lowered", {}).get("mean", float("nan")) for m in names]
        share_err = [100 * s["methods"][m].get("share_lowered", {}).get("ci95", 0.0) for m in names]
        share_err = [0.0 if math.isnan(e) else e for e in share_err]
        axes[1].bar(xs, share, width, yerr=share_err, capsize=3, label=f"{s['setting']} rewards")
    for a in axes:
        a.set_xticks(ticks, order, rotation=20, ha="right", fontsize=8)
    axes[0].axhline(start["accuracy"], color="grey", lw=0.8, ls="--", label="start model")
    axes[0].set(ylabel="held-out accuracy", title="held-out accuracy (95% CI, seeds × prompts)", ylim=(0, 1))
    axes[1].set(ylabel="% of y_w with Δ_R < 0", title="preferred answers made less likely (95% CI over seeds)")
    for a in axes:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------------------
# the two settings
# ------------------------------------------------------------------------------------------------------------

def reward_model_groups(args: argparse.Namespace, train: Path, validation: Path, start: Path) -> tuple[Path, dict]:
    """Setting ``rm``: a Bradley–Terry RM on the training split's pairs, scoring every training answer."""
    out = args.out / "rm"
    scored = out / "train_rm_scored.jsonl"
    report_file = out / "rm.json"
    key = hashlib.sha256(json.dumps([file_hash(train), file_hash(validation), args.start_id, args.rm_steps,
                                     args.rm_lr]).encode()).hexdigest()[:20]
    out.mkdir(parents=True, exist_ok=True)
    if report_file.is_file() and scored.is_file() and json.loads(report_file.read_text()).get("key") == key:
        return scored, json.loads(report_file.read_text())  # the rm setting made it in this same --out
    if args.reuse and (Path(args.reuse) / "rm" / "rm.json").is_file():
        old = json.loads((Path(args.reuse) / "rm" / "rm.json").read_text())
        if old.get("key") == key:
            shutil.copy(Path(args.reuse) / "rm" / scored.name, scored)
            report_file.write_text(json.dumps(old, indent=1) + "\n")
            keep(args, scored)
            keep(args, report_file)
            print(f"reused the reward model's scores from {args.reuse}", flush=True)
            return scored, old
    t0 = time.time()
    rm_dir = fresh_dir(out / "train")
    run_command(torchrun_module(args.procs, "rao_megatron.cli.train", "--config", CONFIG, "train.task=rm",
                                "loss.name=bt", f"model.init_checkpoint={start}", f"data.train_path={train}",
                                f"data.eval_path={validation}", f"train.steps={args.rm_steps}",
                                f"train.lr={args.rm_lr}", "train.eval_every=0", f"train.output_dir={rm_dir}",
                                "train.reference=auto", "checkpoint.keep_last=1"))
    # the scores replace the rule rewards of every training answer

    run_command(python_module("rao_megatron.cli.annotate", "--data", train, "--out", scored, "--reward-model",
                              rm_dir / "checkpoints", "--pp", 1, "--no-progress", "--restart"))
    metrics = read_jsonl(rm_dir / "metrics.jsonl")
    last_eval = next((m for m in reversed(metrics) if any(k.startswith("eval") for k in m)), {})
    rewards = [r for g in read_jsonl(scored) for r in g["rewards"]]
    report = {"key": key, "steps": args.rm_steps, "lr": args.rm_lr, "seconds": round(time.time() - t0, 1),
              "validation": {k: v for k, v in last_eval.items() if k.startswith("eval")},
              "score_mean": sum(rewards) / len(rewards), "score_min": min(rewards), "score_max": max(rewards)}
    report_file.write_text(json.dumps(report, indent=1) + "\n")
    keep(args, scored)
    keep(args, report_file)
    return scored, report


def run_setting(args: argparse.Namespace, runner: Runner, setting: str, data: Path, validation_prompts: Path,
                heldout: Path, prompts: dict[str, dict], kept: dict[str, dict] | None = None,
                groups_file: Path | None = None) -> tuple[dict, dict]:
    """``kept``: tuned points to take over (method -> the other setting's grid result) instead of a grid here.
    ``online``: ``data`` is the training split's prompt file and ``groups_file`` the start model's groups of those
    prompts (the rule setting's data: the preferred answers of the displacement probe, the tied counts)."""
    own = getattr(args, f"{setting}_methods", None)
    asked = own or args.methods or SETTING_METHODS[setting]
    methods = [m.strip() for m in asked.split(",") if m.strip()]
    online = {"rounds": args.online_rounds, "prompts_per_round": args.online_prompts} if setting == "online" else None
    groups = read_jsonl(groups_file or data)
    grao_data = write_jsonl(with_reference(groups, prompts), args.out / f"{setting}_train_grao.jsonl") \
        if "grao" in methods and not online else None
    data_for = {m: grao_data if m == "grao" and grao_data else data for m in methods}
    probe_file = write_jsonl(preferred_probe(groups), args.out / f"{setting}_probe_preferred.jsonl")
    probe = (probe_file, {} if args.report else
             forward_logps(args, runner.start_ckpt, probe_file, args.out / f"{setting}_probe_start.safetensors"))
    schedule = None
    if setting == "rm_k2":
        schedule = k2_schedule(len(groups), args.global_batch_groups, args.k2_epochs)
        every_epoch = list(range(schedule["save_every"], schedule["steps"] + 1, schedule["save_every"]))
    grids = grids_of(setting)
    tuned = {}
    for m in (m for m in methods if m not in VARIANTS):  # every grid first, then the seeds seed by seed
        if kept and m in kept:
            tuned[m] = kept[m]  # carries its "tuned_in"
            continue
        scored = []  # (validation accuracy, point, the step validated or None)
        for point in grids[m][: args.grid_points]:
            kw = {"schedule": {**schedule, "eval_steps": every_epoch}} if schedule else {"online": online}
            r = runner.run(setting=setting, method=m, point=point, seed=args.seed_list[0], data=data_for[m],
                           eval_name="validation", eval_prompts=validation_prompts, probe=None, **kw)
            if r is None:
                continue
            if schedule:  # each epoch's checkpoint is a candidate, the earliest first on ties
                scored += [(r["by_step"][str(s)]["accuracy"], point, s) for s in every_epoch]
            else:
                scored.append((r["accuracy"], point, None))
        if scored:
            best = max(scored, key=lambda x: x[0])  # first on ties
            tuned[m] = {"point": best[1], "validation": best[0], "tuned_in": setting,
                        "grid_complete": len({id(p) for _, p, _ in scored}) == len(grids[m][: args.grid_points]),
                        "grid": [{"point": p, "validation_accuracy": a, **({"step": s} if s else {})}
                                 for a, p, s in scored]}
            if best[2] is not None:
                tuned[m]["eval_step"] = best[2]
    for m in (m for m in methods if m in VARIANTS):
        base, extra = VARIANTS[m]
        source = tuned.get(base) or (kept or {}).get(base)
        if source is None:
            if args.report:
                continue  # its base is not tuned yet
            raise SystemExit(f"alignment benchmark: variant {m!r} trains at {base!r}'s point; add {base} to the "
                             f"{setting} setting's methods")
        tuned[m] = {**source, "point": {**source["point"], **extra}}
    finals: dict[str, list[dict]] = {m: [] for m in tuned}
    for s in args.seed_list:
        for m in tuned:
            kw = {"schedule": {**schedule, "eval_steps": [tuned[m]["eval_step"]]}} if schedule else {"online": online}
            r = runner.run(setting=setting, method=m, point=tuned[m]["point"], seed=s, data=data_for[m],
                           eval_name="heldout", eval_prompts=heldout, probe=probe, **kw)
            if r is not None:
                finals[m].append(r)
    finals = {m: runs for m, runs in finals.items() if runs}
    if not finals:
        return {"setting": setting, "methods": {}, "grids": tuned}, finals
    n_differ = sum(differs(g) for g in groups)
    used = {m: n_differ if drops_tied(m, tuned[m]["point"]) else len(groups) for m in finals}
    visits = {}
    for m, runs in finals.items():
        if online:  # every round trains each of its groups once: its informative groups are counted
            used[m] = round(sum(online_groups(r, drops_tied(m, tuned[m]["point"])) for r in runs) / len(runs))
            visits[m] = (sum(sum(x["informative_groups"] for x in r["rounds"]) for r in runs) / len(runs), "rounds")
            continue
        each = [informative_visits(r, groups=len(groups), differing=n_differ, drops_tied=drops_tied(
            m, tuned[m]["point"]), steps=schedule["steps"] if schedule else args.steps,
            batch=args.global_batch_groups) for r in runs]
        hows = sorted({h for _, h in each})
        visits[m] = (sum(v for v, _ in each) / len(each), "/".join(hows))
    summary = summarise(setting, finals, tuned, used, args.bootstrap, visits)
    summary["grids"] = tuned
    summary["train_groups"] = len(groups)
    summary["tied_groups"] = sum(not differs(g) for g in groups)
    summary["tied_all_wrong"] = sum(not differs(g) and max(g["rewards"]) <= 0 for g in groups)
    summary["probe_answers"] = len(read_jsonl(probe_file))
    if schedule:
        summary["schedule"] = schedule
    if online:
        summary["online"] = online
    return summary, finals


def online_groups(run: dict, drops: bool) -> int:
    """Groups an online run trained on over its rounds: all of them, or where the loss drops tied groups the
    informative ones."""
    return sum(x["informative_groups"] if drops else x["groups"] for x in run["rounds"])


def tied_detail(summary: dict) -> str:
    """``: 24 all wrong, 2 all right`` for 0/1 rewards (the all-wrong count is of groups whose rewards are all ≤ 0)."""
    if summary["setting"] != "rule" or not summary.get("tied_groups"):
        return ""
    wrong = summary.get("tied_all_wrong", 0)
    return f": {wrong} all wrong, {summary['tied_groups'] - wrong} all right"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default=str(REPO / "runs/demo"), help="the quick-start's run directory")
    p.add_argument("--out", default=str(REPO / "runs/alignment"))
    p.add_argument("--reuse", default=None, help="take finished runs with the same key from this directory")
    p.add_argument("--settings", default="rule,rm,rm_k2,online", help="rule (0/1 rewards), rm (Bradley–Terry "
                   "scores), rm_k2 (the best and worst answer of each group by those scores, several epochs), online "
                   "(rounds of sampling with the policy itself, rule rewards)")
    p.add_argument("--methods", default=None, help="comma list; default rule: dpo,simpo,rpo,rao,grao; rm and rm_k2: "
                   "dpo,rpo,rao; online: grao,rao,dpo")
    p.add_argument("--seeds", type=int, default=5, help="seeds per tuned method (1234, 1235, ...)")
    p.add_argument("--grid-points", type=int, default=99, help="first N points of each method's grid (every "
                   "method's grid has the same size in every setting)")
    p.add_argument("--validation", type=int, default=25, help="training prompts kept aside for tuning")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--global-batch-groups", type=int, default=8)
    p.add_argument("--rm-methods", default=None, help="the rm setting's methods (default: --methods, else "
                   f"dpo,rpo,rao); variants: {', '.join(VARIANTS)}")
    p.add_argument("--rm-grid", action="store_true", help="tune the rm setting on its own grid (default: each "
                   "method keeps the point its rule-setting grid chose, when that setting runs first)")
    p.add_argument("--rm-k2-methods", default=None, help="the rm_k2 setting's methods (default: --methods, else "
                   "dpo,rpo,rao); it always tunes on its own grids (RM_K2_GRIDS)")
    p.add_argument("--online-methods", default=None, help="the online setting's methods (default: --methods, "
                   "else grao,rao,dpo)")
    p.add_argument("--online-grid", action="store_true", help="tune the online setting on its own grid (default: "
                   "each method keeps the point its rule-setting grid chose, when that setting runs first)")
    p.add_argument("--online-rounds", type=int, default=3, help="online: rounds of sample -> score -> update")
    p.add_argument("--online-prompts", type=int, default=32, help="online: training prompts sampled per round "
                   "(the next ones each round); 3 rounds x 32 prompts / 8 groups per step = the offline 12 steps")
    p.add_argument("--k2-epochs", type=int, default=3, help="rm_k2: passes over the training groups; a checkpoint "
                   "after each, the one with the best validation accuracy (first seed, grid runs) is kept")
    p.add_argument("--rm-steps", type=int, default=30)
    p.add_argument("--rm-lr", type=float, default=1e-5)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--k", type=int, default=4, help="sampled answers per held-out prompt")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--keep", action="store_true", help="keep every run's checkpoints and HF export")
    p.add_argument("--report", action="store_true", help="train nothing: the tables of what --reuse holds "
                                                         "(methods with fewer seeds are marked)")
    p.add_argument("--results", default=None, help="also copy every finished result (and the split, the RM "
                                                   "scores, the report) here as it finishes: small files to keep")
    args = p.parse_args()
    args.demo, args.out = Path(args.demo).resolve(), Path(args.out).resolve()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if unknown := sorted(set(settings) - set(SETTING_METHODS)):
        p.error(f"unknown settings {unknown}; choose from {', '.join(SETTING_METHODS)}")
    for flag, value in (("--methods", args.methods), ("--rm-methods", args.rm_methods),
                        ("--rm-k2-methods", args.rm_k2_methods), ("--online-methods", args.online_methods)):
        if value and (unknown := sorted({m.strip() for m in value.split(",")} - set(GRIDS) - set(VARIANTS))):
            p.error(f"{flag}: unknown methods {unknown}; choose from {', '.join([*GRIDS, *VARIANTS])}")
    if args.report and not args.reuse:
        p.error("--report needs --reuse DIR (the finished runs to report)")
    if args.reuse and Path(args.reuse).resolve() == args.out:
        p.error("--reuse must name another directory than --out (--out is emptied first)")
    if args.results and Path(args.results).resolve() == args.out:
        p.error("--results must name another directory than --out (--out is emptied first)")
    args.seed_list = [1234 + i for i in range(args.seeds)]
    t_start = time.time()
    if args.out.exists():
        shutil.rmtree(args.out)  # no silent reuse: --reuse names what may be taken over
    args.out.mkdir(parents=True)
    run_command(python_module("rao_megatron.cli.demo", "--out", args.demo, "--until", "reference"))
    data_dir = args.demo / "data"
    start_ckpt = args.demo / "start_megatron"
    from rao_megatron.training.reference_cache import checkpoint_content_id

    args.start_id = checkpoint_content_id(REPO / ".cache/smollm2-hf")  # the start's weights (converted exactly)
    prompts = task_prompts(data_dir / "train_prompts_grao.jsonl")
    inputs = args.out / "inputs"
    inputs.mkdir()
    earlier = Path(args.reuse) / "inputs" if args.reuse else None
    if earlier is not None and earlier.is_dir():
        # the earlier run's split (its sampled answers may differ in a last digit of rounding on another CPU,
        # which would change every run's key): its runs are only reusable on the same data
        for f in earlier.glob("*.jsonl"):
            shutil.copy(f, inputs / f.name)
        print(f"training / validation split taken from {earlier}", flush=True)
    else:
        train, validation = split_groups(read_jsonl(data_dir / "train_groups.jsonl"), args.validation, seed=0)
        write_jsonl(train, inputs / "train_rule.jsonl")
        write_jsonl(validation, inputs / "validation_rule.jsonl")
        write_jsonl([prompts[str(g["id"])] for g in validation], inputs / "validation_prompts.jsonl")
    train_file, validation_file = inputs / "train_rule.jsonl", inputs / "validation_rule.jsonl"
    validation_prompts = inputs / "validation_prompts.jsonl"
    train, validation = read_jsonl(train_file), read_jsonl(validation_file)
    # the online setting's prompts: the training split's, from the task (not the earlier run's copy)
    train_prompts = write_jsonl([prompts[str(g["id"])] for g in train], inputs / "train_prompts.jsonl")
    for f in (train_file, validation_file, validation_prompts, train_prompts):
        keep(args, f)
    heldout = data_dir / "heldout_prompts.jsonl"
    # the reference log-probs of the training split (RM-scored copies have the same sequences: same cache)
    cache = args.out / "train_reference.safetensors"
    if not args.report:
        forward_logps(args, start_ckpt, train_file, cache)
    start_answers = args.out / "start_heldout_answers.jsonl"
    if args.report and (Path(args.reuse) / start_answers.name).is_file():
        shutil.copy(Path(args.reuse) / start_answers.name, start_answers)
        start_scores = score_answers(start_answers)
    else:
        start_scores = answer(args, REPO / ".cache/smollm2-hf", heldout, start_answers, args.seed_list[0])
    keep(args, start_answers)
    start = {"accuracy": accuracy(start_scores)}
    runner = Runner(args, start_ckpt, cache)
    summaries, rm_report = [], None
    for setting in settings:
        data = train_file
        if setting in ("rm", "rm_k2"):
            if args.report and not (Path(args.reuse) / "rm" / "rm.json").is_file():
                continue  # no reward model yet
            data, rm_report = reward_model_groups(args, train_file, validation_file, start_ckpt)
        if setting == "rm_k2":
            data = write_jsonl(best_worst(read_jsonl(data)), args.out / "rm" / "train_rm_k2.jsonl")
            keep(args, data)
        kept, groups_file = None, None
        if setting == "rm" and not args.rm_grid or setting == "online" and not args.online_grid:
            kept = next((s["grids"] for s in summaries if s["setting"] == "rule"), None)
        if setting == "online":
            data, groups_file = train_prompts, train_file
        summary, _ = run_setting(args, runner, setting, data, validation_prompts, heldout, prompts, kept, groups_file)
        summaries.append(summary)
    result = {"start": start, "settings": summaries, "rm": rm_report, "seeds": args.seed_list, "steps": args.steps,
              "grid_points": args.grid_points, "k2_epochs": args.k2_epochs,
              "global_batch_groups": args.global_batch_groups, "train_groups": len(train),
              "validation_prompts": len(validation), "heldout_prompts": len(start_scores), "k": args.k,
              "wall_seconds": round(time.time() - t_start, 1),
              "command": " ".join(sys.argv)}
    (args.out / "alignment.json").write_text(json.dumps(result, indent=1) + "\n")
    md = "\n\n".join(f"**{s['setting']} rewards** ({s['train_groups']} training groups, {s['tied_groups']} of them "
                     f"tied{tied_detail(s)})\n\n{table(s)}\n\nintervals (95%; RAO − method paired):\n\n"
                     f"{interval_table(s)}" + (f"\n\nonline rounds (means over seeds):\n\n{rounds_table(s)}"
                                               if rounds_table(s) else "")
                     for s in summaries if s.get("train_groups"))
    md += f"\n\nstart model held-out accuracy {start['accuracy']:.3f}; wall time {result['wall_seconds'] / 60:.0f} min"
    (args.out / "alignment.md").write_text(md + "\n")
    plot(summaries, start, args.out / "alignment.png")
    for name in ("alignment.json", "alignment.md", "alignment.png"):
        keep(args, args.out / name)
    print("\n" + md)
    print(f"\n{args.out / 'alignment.json'}, {args.out / 'alignment.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
