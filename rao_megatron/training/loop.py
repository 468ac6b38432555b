"""The training loop: Megatron DDP + optimizer + LR schedule around the forward/backward engine."""

from __future__ import annotations

import math
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
from rao_megatron.training import setup
from rao_megatron.training.engine import (
    attach_reference_logps,
    build_model_chunks,
    forward_backward,
    global_normalizer,
    reduce_step_loss,
)
from rao_megatron.training.forward_step import LogprobSettings, PolicyStep, RewardModelStep
from rao_megatron.training.metrics import MetricsWriter, mean_metrics, plot_metrics


def build_optimizer(cfg: Config, chunks: list[torch.nn.Module]) -> tuple[Any, OptimizerParamScheduler]:
    """Adam (distributed optimizer on GPU) with warm-up + cosine decay."""
    t = cfg.train
    bf16 = cfg.model.dtype == "bf16"
    opt_cfg = OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                              adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, clip_grad=t.clip_grad,
                              bf16=bf16, params_dtype=setup.params_dtype(cfg),
                              use_distributed_optimizer=torch.cuda.is_available())
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


def _count_tokens(microbatches: list[dict[str, torch.Tensor]]) -> int:
    total = torch.tensor([sum(int(mb["seq_lengths"][mb["group_ids"] >= 0].sum()) for mb in microbatches)],
                         dtype=torch.float64)
    if ps.get_data_parallel_world_size() > 1:
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
                                                 params_dtype=setup.params_dtype(cfg))
            for ref, pol in zip(self.ref_chunks, self.chunks):
                ref.load_state_dict(pol.module.state_dict())  # the reference is the initial policy
        self.optimizer, self.scheduler = build_optimizer(cfg, self.chunks)
        self.step = 0

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
        """One optimizer step over ``train.global_batch_groups`` groups; returns its metrics record."""
        start = time.perf_counter()
        microbatches = self.train_batcher.next_step()
        self._prepare(microbatches)
        normalizer = global_normalizer(self.spec, microbatches)
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = forward_backward(self.chunks, self._loss_step(normalizer), microbatches)
        loss = reduce_step_loss(outputs)
        update_ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.step += 1
        elapsed = time.perf_counter() - start
        tokens = _count_tokens(microbatches)
        record = {"step": self.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                  "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                  "tokens_per_s": tokens / elapsed, "step_time_s": elapsed, "update_ok": bool(update_ok)}
        record.update(_gather_step_metrics(outputs))
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and metrics over the held-out groups (forward only)."""
        if self.eval_batcher is None:
            return {}
        microbatches = list(self.eval_batcher.iter_eval_microbatches())
        self._prepare(microbatches)
        normalizer = global_normalizer(self.spec, microbatches)
        outputs = forward_backward(self.chunks, self._loss_step(normalizer), microbatches, forward_only=True)
        metrics = {"eval/loss": reduce_step_loss(outputs)}
        metrics.update({f"eval/{k}": v for k, v in _gather_step_metrics(outputs).items()})
        return metrics

    def run(self) -> dict[str, Any]:
        """Train, log, evaluate, save the final model and draw the plots; returns the last record."""
        from tqdm import tqdm

        cfg = self.cfg
        rank0 = setup.is_rank0()
        if rank0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.output_dir / "config.yaml")
            setup.log0(self.groups.report.summary())
            if self.groups.heldout_report is not None:
                setup.log0(self.groups.heldout_report.summary())
            setup.log0(f"{len(self.groups.train)} training groups, {len(self.groups.heldout)} held out; "
                       f"reference log-probs: {self._reference_mode()}")
        writer = MetricsWriter(self.output_dir, enabled=rank0)
        bar = tqdm(total=cfg.train.steps, disable=not rank0, desc=f"{cfg.loss.name} training", dynamic_ncols=True)
        record: dict[str, Any] = {}
        try:
            while self.step < cfg.train.steps:
                record = self.train_step()
                last = self.step == cfg.train.steps
                if (cfg.train.eval_every and self.step % cfg.train.eval_every == 0) or last:
                    record.update(self.evaluate())
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"step {self.step}: loss is {record['loss']}")
                writer.write(record)
                bar.update(1)
                bar.set_postfix(_postfix(record))
        finally:
            bar.close()
            writer.close()
        self.save_final()
        if rank0:
            plots = plot_metrics(writer.path, self.output_dir / "plots")
            setup.log0(f"metrics: {writer.path}\nplots: {', '.join(str(p) for p in plots)}")
        return record

    def _reference_mode(self) -> str:
        if not self.spec.needs_reference:
            return f"not used by loss '{self.spec.name}'"
        if self.ref_chunks is not None:
            return "on the fly (frozen copy of the initial policy)"
        return f"cached ({self.train_batcher.reference.path})"

    def save_final(self) -> None:
        if not self.cfg.checkpoint.save_at_end:
            return
        from rao_megatron.training.checkpoint import save_model_checkpoint

        path = self.output_dir / "checkpoints" / "final"
        meta = {"hf_config": self.hf_config.to_dict(), "task": self.cfg.train.task, "step": self.step,
                "tokenizer": self.cfg.model.tokenizer or setup.model_dir(self.cfg)}
        save_model_checkpoint(self.chunks, path, meta)
        setup.log0(f"model checkpoint: {path}")


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    keys = ("loss", "rewards/gap", "rewards/margin", "accuracy", "tokens_per_s")
    return {k.split("/")[-1]: f"{record[k]:.4g}" for k in keys if k in record}
