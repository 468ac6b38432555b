"""Scorers for :func:`rao_megatron.rewards.annotate.annotate`: a rule function, or a trained reward model.

A reward-model score is the scalar head at the last token of the chat-template-tokenized prompt +
response, tokenized exactly as for training (:func:`rao_megatron.data.tokenize_examples`: prompt with
the generation prompt, response tokens + end-of-turn). Sequences longer than ``max_length`` lose the
end of their response (counted as truncated); a prompt that leaves no room rejects the row.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoConfig

from rao_megatron.data import collate_sequences, tokenize_examples
from rao_megatron.data.formats import Example
from rao_megatron.data.packing import collate_packed, empty_packed, packed_order, plan_micro_batches
from rao_megatron.data.tokenizer import load_tokenizer, pad_id

from .annotate import RowScores
from .rows import ParsedRow, Rejection, check_finite, response_field
from .rule import RewardFn, RowError, wants_row

BLOCK = 8  # micro-batches per pipeline schedule call: amortises the pipeline bubble


def prompt_argument(ex: Example) -> str | list[dict[str, str]]:
    """What a reward function gets as ``prompt``: the text of a single user turn, else the messages."""
    if len(ex.prompt) == 1 and ex.prompt[0]["role"] == "user":
        return ex.prompt[0]["content"]
    return [dict(m) for m in ex.prompt]


class RuleScorer:
    """Calls a reward function per response (or once per chunk for a :func:`~.rule.batched` one), on rank 0."""

    def __init__(self, fn: RewardFn, name: str) -> None:
        self.fn, self.fingerprint = fn, f"fn:{name}"
        self.writes = not dist.is_initialized() or dist.get_rank() == 0
        self.with_row = wants_row(fn)
        self.batched = bool(getattr(fn, "batched", False))

    def _one(self, ex: Example, raw: Any) -> list[float] | Rejection:
        prompt, rewards = prompt_argument(ex), []
        for j, response in enumerate(ex.responses):
            try:
                value = self.fn(prompt, response, row=raw) if self.with_row else self.fn(prompt, response)
            except KeyError as e:  # a field the function looked up in the row
                return Rejection(str(e.args[0]) if e.args else None, "missing (the reward function needs it)")
            except ValueError as e:  # RowError included
                field = getattr(e, "field", None)
                return Rejection(response_field(ex, j) if field in (None, "response", "responses") else field,
                                 f"reward function: {e}")
            rewards.append(value)
        return rewards

    def score(self, rows: list[ParsedRow]) -> list[RowScores]:
        """Rewards for every row without a rejection; a raising or non-finite row is rejected."""
        if not self.writes:  # rule functions are cheap: rank 0 does all the work
            return [RowScores() for _ in rows]
        if self.batched:
            return self._score_batched(rows)
        results = []
        for row in rows:
            if row.rejection is not None:
                results.append(RowScores(rejection=row.rejection))
                continue
            assert row.example is not None
            out = self._one(row.example, row.raw)
            if isinstance(out, Rejection):
                results.append(RowScores(rejection=out))
            else:
                results.append(_checked(row.example, out, "the reward function"))
        return results

    def _score_batched(self, rows: list[ParsedRow]) -> list[RowScores]:
        items = [(i, prompt_argument(r.example), y, r.raw) for i, r in enumerate(rows) if r.rejection is None
                 for y in r.example.responses]  # type: ignore[union-attr]
        values = list(self.fn([p for _, p, _, _ in items], [y for _, _, y, _ in items], [w for *_, w in items]))
        if len(values) != len(items):
            raise RowError(None, f"batched reward function returned {len(values)} values for {len(items)} responses")
        per_row: dict[int, list[float]] = {}
        for (i, *_), v in zip(items, values):
            per_row.setdefault(i, []).append(v)
        return [RowScores(rejection=r.rejection) if r.rejection is not None
                else _checked(r.example, per_row[i], "the reward function")  # type: ignore[arg-type]
                for i, r in enumerate(rows)]


def _checked(ex: Example, rewards: list[Any], what: str) -> RowScores:
    bad = check_finite(ex, rewards, what)
    return RowScores(rejection=bad) if bad else RowScores(rewards=[float(r) for r in rewards])


class ModelScorer:
    """Reward-model scores through the Megatron engine at any TP / PP / DP (all ranks call :meth:`score`).

    Needs the model-parallel state (``initialize_model_parallel``). Sequences are sharded over DP ranks and
    scored in micro-batches of ``batch_size`` rows: packed several to a row of ``max_length`` tokens
    (``packing``, default; not for an fp32 model on CUDA, see :func:`packs`), or one per row, sorted by length
    and padded to the block's longest. Every rank gets all scores back.
    """

    def __init__(self, checkpoint: str | os.PathLike, *, batch_size: int = 16, max_length: int = 2048,
                 tokenizer: str | None = None, packing: bool = True) -> None:
        from rao_megatron.models.checkpoint import (
            checkpoint_tokenizer,
            read_checkpoint_meta,
            resolve_checkpoint,
        )
        from rao_megatron.models.hf_config import ModelArch
        from rao_megatron.training.engine import build_model_chunks  # heavy: megatron, model scorer only
        from rao_megatron.training.model_init import load_weights

        path = find_model_checkpoint(checkpoint)
        meta = read_checkpoint_meta(path)
        if meta.get("task") != "rm":
            raise ValueError(f"--reward-model {checkpoint}: the checkpoint is a '{meta.get('task')}' model, not a "
                             "reward model (train one with train.task=rm loss.name=bt)")
        if batch_size < 1 or max_length < 2:
            raise ValueError("--batch-size must be >= 1 and --max-length >= 2")
        self.tokenizer = load_tokenizer(tokenizer or checkpoint_tokenizer(path))
        # the dtype the checkpoint was trained in (fp32 for converted and older checkpoints)
        dtype = torch.bfloat16 if meta.get("dtype") == "bf16" else torch.float32
        arch = ModelArch.from_hf(AutoConfig.for_model(**meta["hf_config"]))
        self.chunks = build_model_chunks(arch, task="rm", wrap_ddp=False, params_dtype=dtype)
        load_weights(self.chunks, path, arch, "rm")  # a LoRA reward model: its base with the adapters merged in
        self.batch_size, self.max_length = batch_size, max_length
        self.packing = packing and packs(self.chunks[0], dtype)
        self.pad = pad_id(self.tokenizer)
        self.fingerprint = f"model:{Path(resolve_checkpoint(path)).resolve()}:max_length={max_length}"
        self.writes = not dist.is_initialized() or dist.get_rank() == 0

    def _tokenize(self, row: ParsedRow) -> tuple[list[int], list[list[int]], int] | Rejection:
        assert row.example is not None
        ex = dataclasses.replace(row.example, reference_answer=None)  # the reference is scored like the rest
        groups, report = tokenize_examples([ex], self.tokenizer, max_length=self.max_length, overlength="truncate")
        if not groups:
            return Rejection("prompt", f"the prompt leaves no room for a response within max_length={self.max_length} "
                             "tokens (raise --max-length)")
        return groups[0].prompt_ids, groups[0].responses, report.responses_truncated

    def score(self, rows: list[ParsedRow]) -> list[RowScores]:
        """Scores of every response of every row (all ranks call this with the same rows)."""
        from megatron.core import parallel_state as ps  # heavy: megatron, model scorer only

        from rao_megatron.parallel.state import is_last_stage

        tokenized = [r.rejection if r.rejection is not None else self._tokenize(r) for r in rows]
        seqs = [(i, t[0], y) for i, t in enumerate(tokenized) if not isinstance(t, Rejection) for y in t[1]]
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = list(range(dp_rank, len(seqs), dp))
        local = self._forward([seqs[k] for k in mine])
        keep = is_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        parts: list[Any] = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
        if dist.is_initialized():
            dist.all_gather_object(parts, (mine, local) if keep else None)
        else:
            parts = [(mine, local)]
        scores = [0.0] * len(seqs)
        for part in parts:
            if part is not None:
                for k, s in zip(*part):
                    scores[k] = s
        results, cursor = [], 0
        for row, t in zip(rows, tokenized):
            if isinstance(t, Rejection):
                results.append(RowScores(rejection=t))
                continue
            n = len(t[1])
            res = _checked(row.example, scores[cursor:cursor + n], "the reward model")  # type: ignore[arg-type]
            res.truncated = t[2] if res.rejection is None else 0
            results.append(res)
            cursor += n
        return results

    @torch.no_grad()
    def _forward(self, seqs: list[tuple[int, list[int], list[int]]]) -> list[float]:
        """Scores of this rank's sequences (meaningful on the last pipeline stage only)."""
        from rao_megatron.training.engine import forward_backward  # heavy: megatron, model scorer only
        from rao_megatron.training.forward_step import ScoreStep

        if self.packing:
            return self._forward_packed(seqs)
        order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][1]) + len(seqs[k][2]))
        scores = [0.0] * len(seqs)
        per_call = self.batch_size * BLOCK
        for start in range(0, len(order), per_call):
            block = order[start:start + per_call]
            # one shape per schedule call (pipeline p2p needs it), as short as the block allows
            longest = max(len(seqs[k][1]) + len(seqs[k][2]) for k in block)
            seq_length = min(self.max_length, -(-longest // 16) * 16)
            mbs = [collate_sequences([seqs[k][1] for k in part], [seqs[k][2] for k in part], seq_length=seq_length,
                                     pad_id=self.pad, group_ids=list(range(len(part))), num_rows=self.batch_size)
                   for part in (block[i:i + self.batch_size] for i in range(0, len(block), self.batch_size))]
            outputs = forward_backward(self.chunks, ScoreStep(), mbs, forward_only=True)
            for j, out in enumerate(outputs):
                part = block[j * self.batch_size:(j + 1) * self.batch_size]
                for k, s in zip(part, out["scores"][:len(part)].tolist()):
                    scores[k] = s
        return scores

    def _forward_packed(self, seqs: list[tuple[int, list[int], list[int]]]) -> list[float]:
        """Packed: each sequence its own group, first-fit decreasing into ``batch_size`` rows of ``max_length``."""
        from rao_megatron.training.engine import forward_backward  # heavy: megatron, model scorer only
        from rao_megatron.training.forward_step import ScoreStep

        plans = plan_micro_batches([[len(x) + len(y)] for _, x, y in seqs], rows=self.batch_size,
                                   seq_length=self.max_length)
        scores = [0.0] * len(seqs)
        for start in range(0, max(len(plans), 1), BLOCK):
            block = plans[start:start + BLOCK]
            placements = [[[k for k, _ in row] for row in plan] for plan in block]
            mbs = [collate_packed([seqs[k][1] for k in range(len(seqs))], [seqs[k][2] for k in range(len(seqs))],
                                  placement=placement, seq_length=self.max_length, pad_id=self.pad,
                                  group_ids=list(range(len(seqs)))) for placement in placements]
            mbs = mbs or [empty_packed(self.batch_size, self.max_length, self.pad)]  # a rank with nothing to score
            for out, placement in zip(forward_backward(self.chunks, ScoreStep(), mbs, forward_only=True), placements):
                for k, s in zip(packed_order(placement), out["scores"].tolist()):
                    scores[k] = s
        return scores


def packs(model: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Whether ``model`` can score packed rows in ``dtype``: not an fp32 model that runs packed rows as
    Transformer Engine THD sequences (CUDA), whose attention takes THD in bf16/fp16 only. Such a reward model
    (fp32 checkpoints: converted ones, or trained on the CPU) scores padded rows instead, in the dtype it
    was trained in: the same scores as packed, only slower -- casting it to bf16 would change them."""
    from rao_megatron.models.provider import uses_thd  # heavy: megatron, model scorer only

    return not (dtype == torch.float32 and uses_thd(model))


def find_model_checkpoint(path: str | os.PathLike) -> Path:
    """A model checkpoint from itself, a checkpoints root (``latest``), or a training run's output directory."""
    from rao_megatron.models.checkpoint import META_FILE, resolve_checkpoint  # heavy: megatron

    p = Path(path)
    for candidate in (p, p / "checkpoints"):
        resolved = resolve_checkpoint(candidate)
        if (resolved / META_FILE).is_file():
            return resolved
    raise FileNotFoundError(f"--reward-model {path}: no model checkpoint there (expected {META_FILE}, a "
                            "'latest' pointer, or a training run's output directory)")


def start_model_scorer(reward_model: str | os.PathLike, *, tp: int = 1, pp: int = 1, batch_size: int = 16,
                       max_length: int = 2048, tokenizer: str | None = None) -> ModelScorer:
    """A :class:`ModelScorer` on a fresh model-parallel layout: joins (or starts) the process group, splits
    it TP × PP (× DP with the rest), then loads the checkpoint; every rank calls this."""
    from rao_megatron.parallel.startup import init_distributed  # heavy: megatron, model scorer only
    from rao_megatron.parallel.state import check_world, initialize_model_parallel

    init_distributed()
    check_world(dist.get_world_size(), tp, pp, keys="--")
    initialize_model_parallel(tp=tp, pp=pp)
    return ModelScorer(reward_model, batch_size=batch_size, max_length=max_length, tokenizer=tokenizer)
