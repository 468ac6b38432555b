"""The training loop: Megatron DDP + optimizer + LR schedule around the forward/backward engine."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from rao_megatron.config import Config, ConfigError, dump_config
from rao_megatron.losses import get_loss
from rao_megatron.parallel.device import compute_device, to_device
from rao_megatron.training import setup
from rao_megatron.training.engine import (
    attach_reference_logps,
    build_model_chunks,
    forward_backward,
    global_normalizer,
    reduce_step_loss,
    use_distributed_optimizer,
)
from rao_megatron.training.forward_step import LogprobSettings, PolicyStep, RewardModelStep
from rao_megatron.training.metrics import MetricsWriter, mean_metrics, plot_metrics


def build_optimizer(cfg: Config, chunks: list[torch.nn.Module]) -> tuple[Any, OptimizerParamScheduler]:
    """Adam (the distributed optimizer per ``parallel.distributed_optimizer``) with warm-up + cosine decay."""
    t = cfg.train
    bf16 = cfg.model.dtype == "bf16"
    opt_cfg = OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                              adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, clip_grad=t.clip_grad,
                              bf16=bf16, params_dtype=setup.params_dtype(cfg),
                              use_distributed_optimizer=use_distributed_optimizer(cfg.parallel.distributed_optimizer))
    optimizer = get_megatron_optimizer(opt_cfg, chunks)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if t.warmup_steps else t.lr, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps, lr_decay_steps=max(t.steps, t.warmup_steps + 1),
        lr_decay_style="cosine", start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=t.steps, wd_incr_style="constant")
    return optimizer, scheduler


def _gather_step_metrics(outputs: list[dict[str, Any]]) -> dict[str, float]:
    """Loss-function metrics averaged over micro-batches and DP ranks (group-weighted), on every rank."""
    local = None
    if ps.is_pipeline_last_stage(ignore_virtual=True) and outputs:
        local = (mean_metrics([o["metrics"] for o in outputs], [o["groups"] for o in outputs]),
                 sum(o["groups"] for o in outputs))
    if ps.get_data_parallel_world_size() > 1:
        parts: list[Any] = [None] * ps.get_data_parallel_world_size()
        dist.all_gather_object(parts, local, group=ps.get_data_parallel_group())
        parts = [p for p in parts if p is not None]
        local = (mean_metrics([p[0] for p in parts], [p[1] for p in parts]), sum(p[1] for p in parts)) if parts else None
    box = [local]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
    metrics = dict(box[0][0]) if box[0] else {}
    metrics.pop("loss", None)  # the step loss is the normalised global sum, reported separately
    return metrics


def _sum_over_data(outputs: list[dict[str, Any]], key: str) -> list[int]:
    """Sum of the integer tuples ``o[key]`` over micro-batches and DP ranks, on every rank."""
    width = len(outputs[0][key]) if outputs else 0
    local = [sum(o[key][i] for o in outputs) for i in range(width)]
    box = [local if ps.is_pipeline_last_stage(ignore_virtual=True) else None]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
    total = torch.tensor(box[0], dtype=torch.int64, device=compute_device())
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    return [int(x) for x in total.tolist()]


def _count_tokens(microbatches: list[dict[str, torch.Tensor]]) -> int:
    """Real tokens of this step over all DP ranks (call it on the host-side batches: no device sync)."""
    local = sum(int(mb["seq_lengths"][mb["group_ids"] >= 0].sum()) for mb in microbatches)
    if ps.get_data_parallel_world_size() == 1:
        return local
    total = torch.tensor([local], dtype=torch.int64, device=compute_device())
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return int(total.item())


class Trainer:
    """Holds the model, optimizer, data and reference for one run; ``run()`` trains ``train.steps`` steps."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        setup.start(cfg)
        self.output_dir = Path(cfg.train.output_dir)
        self.spec = get_loss(cfg.loss.name)
        self.hparams = cfg.loss.hparams()
        self.tokenizer = setup.load_run_tokenizer(cfg)
        self.hf_config = setup.resolve_hf_config(cfg, self.tokenizer)
        self.groups = setup.load_groups(cfg, self.tokenizer, self.spec)
        self._build_batchers()
        self.logprobs = LogprobSettings(impl=cfg.model.logprob_impl, precision=cfg.model.logprob_precision,
                                        chunk_size=cfg.model.logprob_chunk_size)
        task = "rm" if cfg.train.task == "rm" else "policy"
        self.chunks = setup.build_initial_model(cfg, self.hf_config, task)
        self.ref_chunks = None
        if self.spec.needs_reference and self.train_batcher.reference is None:
            self.ref_chunks = build_model_chunks(self.hf_config, task="reference",
                                                 params_dtype=setup.params_dtype(cfg),
                                                 sequence_parallel=cfg.parallel.sequence_parallel)
            for ref, pol in zip(self.ref_chunks, self.chunks):
                ref.load_state_dict(pol.module.state_dict())  # the reference is the initial policy
        self.optimizer, self.scheduler = build_optimizer(cfg, self.chunks)
        self.step = 0
        self.skipped_steps = 0
        self.bad_in_row = 0
        self.resumed_from = self._resume()

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def _resume(self) -> Path | None:
        """Restore the newest complete checkpoint (``checkpoint.resume``): auto, none, or a directory."""
        from rao_megatron.training.checkpoint import (
            CheckpointError,
            find_resume_checkpoint,
            load_training_checkpoint,
            resolve_checkpoint,
        )

        mode = self.cfg.checkpoint.resume
        if mode == "none":
            return None
        if mode == "auto":
            path = find_resume_checkpoint(self.checkpoint_root, warn=setup.log0)
            if path is None:
                return None
        else:
            path = resolve_checkpoint(mode)
            if not path.is_dir():
                raise CheckpointError(f"config key 'checkpoint.resume': checkpoint directory not found: {mode}")
        state = load_training_checkpoint(path, self.chunks, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_batcher.load_state_dict(state["data"])
        self.step, self.skipped_steps = int(state["step"]), int(state.get("skipped_steps", 0))
        setup.log0(f"resumed from {path} at step {self.step}")
        return path

    def save_checkpoint(self) -> Path:
        """A training checkpoint of the current step (model, optimizer, scheduler, data position, RNG)."""
        from rao_megatron.training.checkpoint import save_training_checkpoint

        meta = {"hf_config": self.hf_config.to_dict(), "task": self.cfg.train.task, "step": self.step,
                "dtype": self.cfg.model.dtype,
                "tokenizer": setup.run_tokenizer_path(self.cfg)}
        state = {"step": self.step, "skipped_steps": self.skipped_steps, "scheduler": self.scheduler.state_dict(),
                 "data": self.train_batcher.state_dict(), "config": self.cfg.to_dict()}
        path = save_training_checkpoint(self.checkpoint_root, self.step, self.chunks, self.optimizer, state, meta,
                                        keep_last=self.cfg.checkpoint.keep_last)
        self._last_saved = self.step
        return path

    def _reference_caches(self) -> tuple[Any, Any]:
        """The precomputed reference caches (train, held-out) this run uses, or (None, None)."""
        from rao_megatron.training.reference_cache import ReferenceCache

        cfg = self.cfg
        if not self.spec.needs_reference or cfg.train.reference == "on_the_fly":
            return None, None
        train_path = setup.reference_cache_path(cfg, cfg.data.train_path)
        if cfg.train.reference == "auto" and not train_path.exists():
            setup.log0(f"no reference cache at {train_path}: computing reference log-probs on the fly")
            return None, None
        train = ReferenceCache(train_path, setup.reference_fingerprints(cfg, self.tokenizer, cfg.data.train_path))
        if not cfg.data.eval_path:
            return train, train
        heldout_path = setup.reference_cache_path(cfg, cfg.data.eval_path, heldout=True)
        return train, ReferenceCache(heldout_path,
                                     setup.reference_fingerprints(cfg, self.tokenizer, cfg.data.eval_path))

    def _build_batchers(self) -> None:
        from rao_megatron.data import GroupBatcher

        cfg, g = self.cfg, self.groups
        ref_train, ref_heldout = self._reference_caches()
        k = max(len(x.responses) for x in g.train + g.heldout)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        common = dict(seq_length=cfg.data.max_length, pad_id=pad, groups_per_micro_batch=cfg.data.groups_per_micro_batch,
                      dp_rank=dp_rank, dp_size=dp, responses_per_group=k, seed=cfg.data.seed)
        try:
            self.train_batcher = GroupBatcher(g.train, global_batch_groups=cfg.train.global_batch_groups,
                                              reference=ref_train, **common)
        except ValueError as e:
            raise ConfigError(f"config keys 'train.global_batch_groups' / 'data.groups_per_micro_batch': {e}") from None
        self.eval_batcher = (GroupBatcher(g.heldout, global_batch_groups=dp * cfg.data.groups_per_micro_batch,
                                          reference=ref_heldout, **common) if g.heldout else None)

    def _loss_step(self, normalizer: float) -> Any:
        if self.cfg.train.task == "rm":
            return RewardModelStep(loss_name=self.spec.name, hparams=self.hparams, normalizer=normalizer)
        return PolicyStep(loss_name=self.spec.name, hparams=self.hparams, normalizer=normalizer,
                          vocab_size=self.hf_config.vocab_size, logprobs=self.logprobs)

    def _prepare(self, microbatches: list[dict[str, torch.Tensor]]) -> None:
        if self.ref_chunks is not None:
            attach_reference_logps(self.ref_chunks, microbatches, vocab_size=self.hf_config.vocab_size,
                                   settings=self.logprobs)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``train.global_batch_groups`` groups; returns its metrics record.

        A non-finite loss or gradient skips the update (counted in ``skipped_steps``); after
        ``train.max_bad_steps`` in a row the run stops with :class:`NonFiniteError`.
        """
        start = time.perf_counter()
        cuda = compute_device().type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        host = self.train_batcher.next_step()
        normalizer = global_normalizer(self.spec, host)  # from the host copies: no device sync
        tokens = _count_tokens(host)
        microbatches = to_device(host)
        self._prepare(microbatches)
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = forward_backward(self.chunks, self._loss_step(normalizer), microbatches)
        loss = reduce_step_loss(outputs)
        self.step += 1
        if self.step in _fault_steps():
            loss = float("nan")
        finite = math.isfinite(loss) and _grads_finite(self.chunks)
        record: dict[str, Any] = {"step": self.step}
        if finite:
            update_ok, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            self.bad_in_row = 0
            record.update(loss=loss, grad_norm=float(grad_norm) if grad_norm is not None else None,
                          update_ok=bool(update_ok))
        else:
            self.skipped_steps += 1
            self.bad_in_row += 1
            record.update(loss=None, grad_norm=None, update_ok=False)
            setup.log0(f"warning: step {self.step}: non-finite loss or gradient; update skipped "
                       f"({self.bad_in_row} in a row)")
            if self.bad_in_row >= self.cfg.train.max_bad_steps:
                raise NonFiniteError(f"{self.bad_in_row} steps in a row with a non-finite loss or gradient "
                                     f"(last at step {self.step}); lower train.lr, check the data, or raise "
                                     "train.max_bad_steps")
        elapsed = time.perf_counter() - start
        record.update(lr=self.optimizer.param_groups[0]["lr"], tokens_per_s=tokens / elapsed,
                      step_time_s=elapsed, skipped_steps=self.skipped_steps)
        if cuda:
            record["gpu_max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if finite:
            record.update(_gather_step_metrics(outputs))
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and metrics over the held-out groups (forward only)."""
        if self.eval_batcher is None:
            return {}
        host = list(self.eval_batcher.iter_eval_microbatches())
        normalizer = global_normalizer(self.spec, host)
        microbatches = to_device(host)
        self._prepare(microbatches)
        outputs = forward_backward(self.chunks, self._loss_step(normalizer), microbatches, forward_only=True)
        metrics = {"eval/loss": reduce_step_loss(outputs)}
        metrics.update({f"eval/{k}": v for k, v in _gather_step_metrics(outputs).items()})
        if self.cfg.train.task == "rm":
            # pooled over all held-out pairs (the mean above weights micro-batches by groups)
            correct, pairs = _sum_over_data(outputs, "pair_counts")
            metrics.update({"eval/accuracy": correct / pairs if pairs else float("nan"), "eval/pairs": pairs,
                            "eval/groups": len(self.groups.heldout)})
        return metrics

    def run(self) -> dict[str, Any]:
        """Train, log, evaluate, checkpoint and draw the plots; returns the last record.

        SIGTERM / SIGUSR1 (SLURM preemption) make the run save a checkpoint at the next step boundary and
        raise :class:`Preempted` (the CLI exits with ``EXIT_PREEMPTED``, which the sbatch scripts requeue on).
        """
        from tqdm import tqdm

        cfg = self.cfg
        rank0 = setup.is_rank0()
        if rank0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
            dump_config(cfg, self.output_dir / "config.yaml")
            setup.log0(self.groups.report.summary())
            if self.groups.heldout_report is not None:
                setup.log0(self.groups.heldout_report.summary())
            setup.log0(f"{len(self.groups.train)} training groups, {len(self.groups.heldout)} held out; "
                       f"reference log-probs: {self._reference_mode()}")
        writer = MetricsWriter(self.output_dir, enabled=rank0, resume=self.resumed_from is not None)
        writer.truncate_after(self.step)  # steps after the checkpoint are recomputed
        self._last_saved = self.step if self.resumed_from is not None else -1
        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=not rank0, desc=f"{cfg.loss.name} training",
                   dynamic_ncols=True)
        record: dict[str, Any] = {}
        with PreemptionHandler() as preemption:
            try:
                while self.step < cfg.train.steps:
                    record = self.train_step()
                    last = self.step == cfg.train.steps
                    if (cfg.train.eval_every and self.step % cfg.train.eval_every == 0) or last:
                        record.update(self.evaluate())
                    writer.write(record)
                    bar.update(1)
                    bar.set_postfix(_postfix(record))
                    if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0 and not last:
                        self.save_checkpoint()
                    if preemption.requested():
                        path = self.save_checkpoint() if self._last_saved != self.step else None
                        if rank0:  # torchrun reports any worker failure as exit 1: leave a marker too
                            (self.output_dir / PREEMPTED_MARKER).write_text(f"{self.step}\n")
                        raise Preempted(f"preempted at step {self.step}; checkpoint {path or 'already saved'}; "
                                        "rerun the same command to resume")
            finally:
                bar.close()
                writer.close()
        if cfg.checkpoint.save_at_end and self._last_saved != self.step:
            path = self.save_checkpoint()
            setup.log0(f"checkpoint: {path}")
        if rank0:
            plots = plot_metrics(writer.path, self.output_dir / "plots")
            setup.log0(f"metrics: {writer.path}\nplots: {', '.join(str(p) for p in plots)}")
            if cfg.train.task == "rm":
                from rao_megatron.rewards.report import write_rm_report

                path, table = write_rm_report(self.output_dir)
                setup.log0(f"\n{table}\n\nreport: {path}")
        return record

    def _reference_mode(self) -> str:
        if not self.spec.needs_reference:
            return f"not used by loss '{self.spec.name}'"
        if self.ref_chunks is not None:
            return "on the fly (frozen copy of the initial policy)"
        return f"cached ({self.train_batcher.reference.path})"


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    keys = ("loss", "rewards/gap", "rewards/margin", "accuracy", "tokens_per_s")
    return {k.split("/")[-1]: f"{record[k]:.4g}" for k in keys if record.get(k) is not None}


#: written to ``train.output_dir`` when a run stops for preemption (holds the step); removed on restart
PREEMPTED_MARKER = "PREEMPTED"


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Preempted(Exception):
    """The run was asked to stop (SIGTERM/SIGUSR1) and saved a checkpoint."""


def _fault_steps() -> set[int]:
    """Steps whose loss is made NaN: ``RAO_FAULT_NAN_STEPS=3,4`` (a test aid for the non-finite guard)."""
    raw = os.environ.get("RAO_FAULT_NAN_STEPS", "")
    return {int(x) for x in raw.split(",") if x.strip()}


def _grads_finite(chunks: list[torch.nn.Module]) -> bool:
    """Whether every gradient of every rank is finite: sums stay on the device, one all-reduce, one host sync."""
    sums = []
    for chunk in chunks:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is not None:
                sums.append(g.detach().sum(dtype=torch.float32).reshape(1))
    bad = torch.zeros(1, device=compute_device())
    if sums:  # the sum of a tensor with an inf or nan is not finite
        bad = (~torch.isfinite(torch.cat(sums).to(bad.device).sum())).float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


class PreemptionHandler:
    """Turns SIGTERM / SIGUSR1 into a flag checked at step boundaries (agreed on by all ranks)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self._flag = False
        self._saved: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self._flag = True

    def __enter__(self) -> PreemptionHandler:
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self._flag else 0.0], device=compute_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
