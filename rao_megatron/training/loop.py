"""The training loop: Megatron DDP + optimizer + LR schedule around the forward/backward engine."""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from tqdm import tqdm

from rao_megatron.config import Config, dump_config
from rao_megatron.data.tokenizer import pad_id
from rao_megatron.losses import get_loss
from rao_megatron.models.checkpoint import resolve_checkpoint
from rao_megatron.models.lora import adapters_disabled, is_adapter_key
from rao_megatron.parallel import startup
from rao_megatron.parallel.compat import fix_fully_reshardable_multi_bucket_save
from rao_megatron.parallel.device import compute_device, to_device
from rao_megatron.training import checkpoint as ckpt
from rao_megatron.training import model_init, preflight, reference, run_data
from rao_megatron.training.engine import (
    attach_reference_logps,
    build_model_chunks,
    forward_backward,
    sync_params,
    use_distributed_optimizer,
)
from rao_megatron.training.forward_step import PolicyStep, RewardModelStep
from rao_megatron.training.metrics import MetricsWriter, plot_metrics
from rao_megatron.training.reductions import (
    count_tokens,
    global_normalizer,
    moe_aux_metrics,
    step_loss,
    step_metrics,
    summed_counts,
)
from rao_megatron.training.reliability import (
    PREEMPTED_MARKER,
    NonFiniteError,
    Preempted,
    PreemptionHandler,
    fault_steps,
    grads_finite,
)
from rao_megatron.training.rm_report import write_rm_report


def build_optimizer(cfg: Config, chunks: list[torch.nn.Module]) -> tuple[Any, OptimizerParamScheduler]:
    """Adam (the distributed optimizer per ``parallel.distributed_optimizer``) with warm-up + cosine decay.

    Update k of a ``train.warmup_steps`` = W warm-up runs at k/W of ``train.lr`` (the first at lr/W, the
    W-th at lr), then the cosine decay towards ``train.min_lr`` over ``train.schedule_steps`` (default
    ``train.steps``; the online loop's rounds set the whole run's). The scheduler sets the lr of the next update
    after each one (Megatron's order), so update k reads schedule step k-1; Megatron's warm-up there is
    ``init_lr + (lr - init_lr) * s / warmup``, which with ``init_lr = lr/W`` over W-1 steps is lr*(s+1)/W.
    (Its usual ``init_lr = 0`` over W steps makes the first update a no-op at lr 0.)
    """
    t = cfg.train
    bf16 = cfg.model.dtype == "bf16"
    opt_cfg = OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                              adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, clip_grad=t.clip_grad,
                              bf16=bf16, params_dtype=model_init.params_dtype(cfg),
                              use_distributed_optimizer=use_distributed_optimizer(cfg.parallel.distributed_optimizer),
                              # as the chunks' DDP (Megatron-LM passes the one flag to both)
                              overlap_param_gather=chunks[0].ddp_config.overlap_param_gather)
    # CUDA's DDP buckets (overlap_grad_reduce): megatron-core's checkpoint save misplaces the optimizer state
    # of multi-bucket buffers without this
    fix_fully_reshardable_multi_bucket_save()
    optimizer = get_megatron_optimizer(opt_cfg, chunks)
    w = t.warmup_steps
    horizon = t.schedule_steps or t.steps
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=t.lr / w if w else t.lr, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=max(w - 1, 0), lr_decay_steps=max(horizon, w + 1),
        lr_decay_style="cosine", start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=t.steps, wd_incr_style="constant")
    return optimizer, scheduler


class Trainer:
    """Holds the model, optimizer, data and reference for one run; ``run()`` trains ``train.steps`` steps."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        startup.start(cfg.parallel, seed=cfg.train.seed)
        startup.check_packing_dtype(cfg.data.packing, cfg.model.dtype)
        self.output_dir = Path(cfg.train.output_dir)
        preflight.check_output_dir(cfg)  # start-up checks come before anything is built or written
        self.spec = get_loss(cfg.loss.name)  # the bound loss needs the data's reward statistics: below
        self.lora = model_init.lora_spec(cfg)  # LoRA adapters on a frozen base, or None (every weight trains)
        self.tokenizer = run_data.load_run_tokenizer(cfg)
        self.arch = model_init.resolve_arch(cfg, self.tokenizer)  # the model's architecture, parsed once
        preflight.check_model_fits(cfg, self.tokenizer, self.arch)
        # the initial model's content id (an init checkpoint's files hashed on rank 0): read once, for the
        # reference caches and the run identity its checkpoints record
        self.model_id = preflight.on_rank0(lambda: reference.model_identity(cfg, self.arch))
        self.groups = run_data.load_groups(cfg, self.tokenizer, self.spec)
        preflight.warn_about_data(self.groups)
        preflight.reward_calibration(cfg, self.groups)
        self.loss = cfg.loss.build()  # the loss with its checked hyper-parameters, passed down as an object
        self._build_batchers()
        self.resume_path = self._resume_checkpoint()  # another run's checkpoint is refused before the model is built
        self.logprobs = run_data.logprob_settings(cfg)
        task = "rm" if cfg.train.task == "rm" else "policy"
        self.chunks = model_init.build_initial_model(cfg, self.arch, task)
        self.ref_chunks = None
        if self.spec.needs_reference and self.train_batcher.reference is None and not self.adapters_off:
            self.ref_chunks = build_model_chunks(self.arch, task="reference",
                                                 params_dtype=model_init.params_dtype(cfg),
                                                 sequence_parallel=cfg.parallel.sequence_parallel)
            for ref, pol in zip(self.ref_chunks, self.chunks):
                # the reference is the initial policy (under LoRA: its base, the adapters left out)
                ref.load_state_dict({k: v for k, v in pol.module.state_dict().items() if not is_adapter_key(k)})
        self.optimizer, self.scheduler = build_optimizer(cfg, self.chunks)
        self.step = 0
        self.skipped_steps = 0
        self.bad_in_row = 0
        self.resumed_from = self._resume()
        if self.resumed_from is None and self.train_batcher.reference is not None:
            startup.log0(reference.step0_reference_check(self.chunks, self.train_batcher,
                                                         vocab_size=self.arch.vocab_size,
                                                         settings=self.logprobs))

    @property
    def adapters_off(self) -> bool:
        """The reference is this model with its LoRA adapters switched off (``train.reference`` adapters_off,
        or auto under LoRA): no frozen copy, no cache."""
        return self.lora is not None and self.cfg.train.reference in ("auto", "adapters_off")

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def fresh_start(self) -> bool:
        """``checkpoint.resume`` fresh (or its old spelling none): the run starts afresh in ``train.output_dir``."""
        return self.cfg.checkpoint.resume in ("fresh", "none")

    def _initial_model(self) -> tuple[str, str]:
        """``(id, source)`` of the initial model as a checkpoint records it: an init checkpoint's content
        (read on rank 0, once), or a random init's preset or HF config and seed. (Not the random init's
        HF config dict: what ``transformers`` writes into it changes between its releases.)"""
        if self.cfg.model.init_checkpoint:
            return self.model_id
        return self.model_id[1], self.model_id[1]

    def _resume_checkpoint(self) -> Path | None:
        """The checkpoint to resume (``checkpoint.resume``: auto, fresh / none, or a directory), checked
        against this run: another run's is refused unless ``checkpoint.allow_changed_run``. Reads its
        ``train_state.json`` only; records this run's identity for its own checkpoints."""
        cfg = self.cfg
        self.identity = ckpt.run_identity(cfg.train.task, cfg.loss, self._initial_model(),
                                          peft=self.lora.to_dict() if self.lora is not None else None)
        mode = cfg.checkpoint.resume
        if self.fresh_start:
            init = cfg.model.init_checkpoint and resolve_checkpoint(cfg.model.init_checkpoint).resolve()
            if init and self.checkpoint_root.resolve() in init.parents:
                raise ckpt.CheckpointError(
                    f"checkpoint.resume={mode} would delete model.init_checkpoint {init} with the other "
                    f"checkpoints in {self.checkpoint_root}: copy it elsewhere or use a new train.output_dir")
            return None
        if mode == "auto":
            path = ckpt.find_resume_checkpoint(self.checkpoint_root, warn=startup.log0)
            if path is None:
                return None
        else:
            path = resolve_checkpoint(mode)
            if not path.is_dir():
                raise ckpt.CheckpointError(f"config key 'checkpoint.resume': checkpoint directory not found: {mode}")
            if (problem := ckpt.verify_checkpoint(path)) is not None:
                raise ckpt.CheckpointError(f"checkpoint {path} cannot be resumed: {problem}")
        ckpt.check_run(path, self.identity, self.train_batcher.state_dict(), chosen=mode != "auto",
                       allow=cfg.checkpoint.allow_changed_run, note=startup.log0)
        return path

    def _resume(self) -> Path | None:
        """Restore the checkpoint :meth:`_resume_checkpoint` chose: model, optimizer, scheduler, data position."""
        path = self.resume_path
        if path is None:
            return None
        state = ckpt.load_training_checkpoint(path, self.chunks, self.optimizer)
        saved = state.get("config", {}).get("loss", {}).get("reward_stats")
        if saved is not None and saved != self.cfg.loss.reward_stats:
            # the reward calibration is part of the objective: a resumed run keeps the one it started with
            startup.log0(f"reward statistics restored from {path} (the data's differ: {self.cfg.loss.reward_stats})")
            self.cfg.loss.reward_stats = saved
            self.loss = self.cfg.loss.build()
        self.scheduler.load_state_dict(state["scheduler"])
        data, ours = state["data"], self.train_batcher.state_dict()
        if self.cfg.checkpoint.allow_changed_run:
            if data.get("fingerprint") != ours["fingerprint"]:
                # other data: a position in the old stream means nothing in this one, which starts afresh
                # (the online loop's next round: the optimizer carries over, every new group is trained)
                startup.log0(f"note: {path} was trained on other data: this run's data stream starts at its beginning")
                data = ours
            else:  # on purpose: at the checkpoint's position, in this run's stream
                data = {**data, **{k: v for k, v in ours.items() if k not in ("epoch", "index")}}
        self.train_batcher.load_state_dict(data)
        self.step, self.skipped_steps = int(state["step"]), int(state.get("skipped_steps", 0))
        startup.log0(f"resumed from {path} at step {self.step}")
        return path

    def save_checkpoint(self) -> Path:
        """A training checkpoint of the current step (model, optimizer, scheduler, data position, RNG)."""
        meta = {"hf_config": self.arch.hf_dict, "task": self.cfg.train.task, "step": self.step,
                "dtype": self.cfg.model.dtype,
                "tokenizer": run_data.run_tokenizer_path(self.cfg), **model_init.lora_meta(self.cfg, self.model_id)}
        state = {"step": self.step, "skipped_steps": self.skipped_steps, "scheduler": self.scheduler.state_dict(),
                 "data": self.train_batcher.state_dict(), "config": self.cfg.to_dict(), "run": self.identity}
        sync_params(self.chunks)  # CUDA: the last update's parameter all-gather waits for a forward pass
        path = ckpt.save_training_checkpoint(self.checkpoint_root, self.step, self.chunks, self.optimizer, state, meta,
                                        keep_last=self.cfg.checkpoint.keep_last)
        self._last_saved = self.step
        return path

    def _reference_caches(self) -> tuple[Any, Any]:
        """The precomputed reference caches (train, held-out) this run uses, or (None, None); checked
        against the run and for every sequence of it (:func:`reference.open_reference_caches`)."""
        cfg = self.cfg
        if not self.spec.needs_reference or cfg.train.reference == "on_the_fly" or self.adapters_off:
            return None, None
        return reference.open_reference_caches(cfg, self.tokenizer, self.model_id, self.groups)

    def _build_batchers(self) -> None:
        self.train_batcher, self.eval_batcher = run_data.build_batchers(
            self.cfg, self.groups, pad_id=pad_id(self.tokenizer), dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(), references=self._reference_caches(),
            arch=self.arch)

    def _loss_step(self, normalizer: float) -> Any:
        if self.cfg.train.task == "rm":
            return RewardModelStep(loss=self.loss, normalizer=normalizer)
        return PolicyStep(loss=self.loss, normalizer=normalizer,
                          vocab_size=self.arch.vocab_size, logprobs=self.logprobs)

    def _prepare(self, microbatches: list[dict[str, torch.Tensor]]) -> None:
        if self.adapters_off and self.spec.needs_reference:
            with adapters_disabled(self.chunks):
                attach_reference_logps(self.chunks, microbatches, vocab_size=self.arch.vocab_size,
                                       settings=self.logprobs)
        elif self.ref_chunks is not None:
            attach_reference_logps(self.ref_chunks, microbatches, vocab_size=self.arch.vocab_size,
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
        normalizer = global_normalizer(self.loss, host)  # from the host copies: no device sync
        tokens, filled, slots = count_tokens(host)
        microbatches = to_device(host)
        self._prepare(microbatches)
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = forward_backward(self.chunks, self._loss_step(normalizer), microbatches)
        loss = step_loss(outputs)
        # MoE: the router load-balancing term, reported apart. All-padding micro-batches (equal_micro_batches)
        # count: their forwards add to Megatron's tracker, and it scales each one's term by 1/len(microbatches)
        moe = moe_aux_metrics(self.chunks, len(microbatches))
        self.step += 1
        if self.step in fault_steps():
            loss = float("nan")
        finite = math.isfinite(loss) and grads_finite(self.chunks)
        record: dict[str, Any] = {"step": self.step}
        lr = self.optimizer.param_groups[0]["lr"]  # the update's own: the scheduler sets the next one after it
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
            _warn(f"warning: step {self.step}: non-finite loss or gradient; update skipped ({self.bad_in_row} in a row)")
            if self.bad_in_row >= self.cfg.train.max_bad_steps:
                raise NonFiniteError(f"{self.bad_in_row} steps in a row with a non-finite loss or gradient "
                                     f"(last at step {self.step}); lower train.lr, check the data, or raise "
                                     "train.max_bad_steps")
        elapsed = time.perf_counter() - start
        record.update(lr=lr, tokens_per_s=tokens / elapsed, step_time_s=elapsed, skipped_steps=self.skipped_steps,
                      packing_efficiency=filled / slots,
                      shared_prompt_ratio=tokens / filled)
        if cuda:
            record["gpu_max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if finite:
            record.update(step_metrics(outputs))
            record.update(moe)
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and metrics over the held-out groups (forward only)."""
        if self.eval_batcher is None:
            return {}
        host = list(self.eval_batcher.iter_eval_microbatches())
        normalizer = global_normalizer(self.loss, host)
        microbatches = to_device(host)
        self._prepare(microbatches)
        outputs = forward_backward(self.chunks, self._loss_step(normalizer), microbatches, forward_only=True)
        metrics = {"eval/loss": step_loss(outputs)}
        metrics.update({f"eval/{k}": v for k, v in step_metrics(outputs).items()})
        if self.cfg.train.task == "rm":
            # pooled over all held-out pairs (the mean above weights micro-batches by groups)
            correct, pairs = summed_counts(outputs, "pair_counts", 2)
            metrics.update({"eval/accuracy": correct / pairs if pairs else float("nan"), "eval/pairs": pairs,
                            "eval/groups": len(self.groups.heldout)})
        return metrics

    def run(self) -> dict[str, Any]:
        """Train, log, evaluate, checkpoint and draw the plots; returns the last record.

        SIGTERM / SIGUSR1 (SLURM preemption) make the run save a checkpoint at the next step boundary and
        raise :class:`Preempted` (the CLI exits with ``EXIT_PREEMPTED``, which the sbatch scripts requeue on).
        """
        cfg = self.cfg
        rank0 = startup.is_rank0()
        if rank0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
            if self.fresh_start:
                self._clear_earlier_run()
            dump_config(cfg, self.output_dir / "config.yaml")
            startup.log0(self.groups.report.summary())
            if self.groups.heldout_report is not None:
                startup.log0(self.groups.heldout_report.summary())
            startup.log0(self.train_batcher.layout_line())
            startup.log0(f"{len(self.groups.train)} training groups, {len(self.groups.heldout)} held out; "
                       f"reference log-probs: {self._reference_mode()}")
            for line in preflight.calibration_lines(self.loss, self.groups):
                startup.log0(line)
        writer = MetricsWriter(self.output_dir, enabled=rank0, resume=self.resumed_from is not None)
        writer.truncate_after(self.step)  # steps after the checkpoint are recomputed
        self._last_saved = self.step if self.resumed_from is not None else -1
        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=not rank0, desc=f"{cfg.loss.name} training",
                   dynamic_ncols=True)
        record: dict[str, Any] = {}
        watch = LossWatch(self.loss)
        with PreemptionHandler() as preemption:
            try:
                while self.step < cfg.train.steps:
                    record = self.train_step()
                    last = self.step == cfg.train.steps
                    if (cfg.train.eval_every and self.step % cfg.train.eval_every == 0) or last:
                        record.update(self.evaluate())
                    writer.write(record)
                    if line := watch(self.step, record):
                        _warn(line)
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
            startup.log0(f"checkpoint: {path}")
        if rank0:
            plots = plot_metrics(writer.path, self.output_dir / "plots")
            startup.log0(f"metrics: {writer.path}\nplots: {', '.join(str(p) for p in plots)}")
            if cfg.train.task == "rm":
                path, table = write_rm_report(self.output_dir)
                startup.log0(f"\n{table}\n\nreport: {path}")
        return record

    def _clear_earlier_run(self) -> None:
        """``checkpoint.resume=fresh``: an earlier run's checkpoints and TensorBoard logs go (its
        metrics.jsonl is replaced), so neither its curves nor its checkpoints mix with this run's."""
        shutil.rmtree(self.output_dir / "tensorboard", ignore_errors=True)
        if deleted := ckpt.delete_checkpoints(self.checkpoint_root):
            startup.log0(f"note: checkpoint.resume={self.cfg.checkpoint.resume}: deleted {deleted} checkpoints of "
                         f"an earlier run in {self.checkpoint_root}")

    def _reference_mode(self) -> str:
        if not self.spec.needs_reference:
            return f"not used by loss '{self.spec.name}'"
        if self.adapters_off:
            return "the base model: this model with its LoRA adapters off"
        if self.ref_chunks is not None:
            return "on the fly (frozen copy of the initial policy)"
        return f"cached ({self.train_batcher.reference.path})"


class LossWatch:
    """The loss's watch over each step's metrics record (``BoundLoss.watch``; RAO: log Z drifting from log_z0):
    its first warning of the run, then None (once per run)."""

    def __init__(self, loss: Any) -> None:
        self.loss = loss
        self.warned = False

    def __call__(self, step: int, record: dict[str, Any]) -> str | None:
        if self.warned:
            return None
        line = self.loss.watch(step, record)
        self.warned = line is not None
        return line


def _warn(line: str) -> None:
    """A warning during the step loop, on rank 0: on a line of its own above the progress bar, not after it."""
    if startup.is_rank0():
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    keys = ("loss", "rewards/gap", "rewards/margin", "accuracy", "tokens_per_s")
    return {k.split("/")[-1]: f"{record[k]:.4g}" for k in keys if record.get(k) is not None}
