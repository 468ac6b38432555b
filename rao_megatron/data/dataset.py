"""Normalised examples -> tokenized groups (t0 check, length policy, drop report) -> per-rank micro-batches."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from .collate import collate_sequences, sequence_key
from .errors import DataError, DataReport
from .formats import Example

OVERLENGTH = ("drop", "truncate", "error")
_SENTINEL = "\u2063RESPONSE\u2063"  # invisible separators: cannot collide with template text


@dataclass
class TokenizedGroup:
    """One prompt and its tokenized responses; each sequence is ``prompt_ids + responses[j]``."""

    group_id: int                      # stable: the source row (JSONL line / table index)
    prompt_ids: list[int]
    responses: list[list[int]]
    rewards: list[float] | None
    is_reference: list[bool] | None    # GRAO's reference answer flag per response
    row: int


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that close an assistant turn in the chat template (``<|im_end|>``, ``<|eot_id|>``), else eos.

    Found by rendering a conversation whose assistant turn is a sentinel and reading what follows it,
    so it works for any template without a table of model families.
    """
    text = ""
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False)
        if isinstance(rendered, str) and _SENTINEL in rendered:
            text = rendered.split(_SENTINEL, 1)[1].strip()
    except Exception:  # noqa: BLE001 - templates may reject this probe; eos is the documented fallback
        text = ""
    if text:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise ValueError("the chat template closes no assistant turn and the tokenizer has no eos token")
    return [tokenizer.eos_token_id]


def _token(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    return f"{token_id} ({tokenizer.decode([token_id])!r})"


def _select(candidates: list[int], rewards: list[float] | None, budget: int) -> list[int]:
    """Keep ``budget`` of ``candidates``: best and worst reward first, then by descending reward."""
    if len(candidates) <= budget:
        return candidates
    if rewards is None:  # unscored: the order carries the preference (chosen first)
        return candidates[:budget]
    order = sorted(candidates, key=lambda j: (-rewards[j], j))
    picked = [order[0], order[-1]] + order[1:-1]
    return sorted(picked[:budget])


def tokenize_examples(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                      overlength: str = "drop", max_responses: int | None = None, min_responses: int = 1,
                      drop_tied: bool = False, t0: int | None = None, source: str = "<data>",
                      chunk_size: int = 512) -> tuple[list[TokenizedGroup], DataReport]:
    """Tokenize prompts with the chat template and responses + end-of-turn; apply the length policy.

    Prompt: ``apply_chat_template(messages, add_generation_prompt=True)`` tokenized without special
    tokens (the template already holds them). Response: ``text`` tokens + end-of-turn tokens, joined
    to the prompt at the token level (as TRL does). A truncated response loses its end-of-turn: it
    was cut, and teaching the model to stop there would be wrong. ``t0`` (default: the first row's
    first token) is the token every sequence must start with (DESIGN §2); a row that does not is a
    :class:`DataError`. ``min_responses`` is 2 for pairwise losses. Every drop is counted in the report.
    """
    if overlength not in OVERLENGTH:
        raise ValueError(f"overlength must be one of {OVERLENGTH}, got {overlength!r}")
    if min_responses < 1:
        raise ValueError(f"min_responses must be >= 1, got {min_responses}")
    if max_responses is not None and max_responses < min_responses:
        raise ValueError(f"max_responses={max_responses} is below min_responses={min_responses}")
    report = DataReport(source=source, rows_read=len(examples))
    if not examples:
        return [], report
    eot = end_of_turn_ids(tokenizer)
    scored = examples[0].rewards is not None
    t0_where = "the caller (the training data's t0)"
    groups: list[TokenizedGroup] = []
    for start in range(0, len(examples), chunk_size):
        chunk = examples[start:start + chunk_size]
        prompt_texts = [tokenizer.apply_chat_template(ex.prompt, add_generation_prompt=True, tokenize=False)
                        for ex in chunk]
        prompt_ids = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
        flat = [y for ex in chunk for y in ex.responses]
        flat_ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        offset = 0
        for ex, x in zip(chunk, prompt_ids):
            ys = [list(ids) + eot for ids in flat_ids[offset:offset + len(ex.responses)]]
            offset += len(ex.responses)
            report.drop("response_no_rating", ex.unrated)
            if (ex.rewards is not None) != scored:
                first = examples[0].where
                raise DataError(source, ex.where, "rewards", f"{'has' if ex.rewards is not None else 'lacks'} "
                                f"rewards but {first} {'has' if scored else 'lacks'} them; all rows must agree")
            if not x:
                raise DataError(source, ex.where, "prompt", "the chat template renders it to no tokens")
            if t0 is None:
                t0, t0_where = x[0], f"the first row, {ex.where}"
            elif x[0] != t0:
                raise DataError(source, ex.where, "prompt",
                                f"its sequences start with token {_token(tokenizer, x[0])}, but t0 = "
                                f"{_token(tokenizer, t0)} (set by {t0_where}): every sequence of a run must "
                                "start with the same token t0 (check the chat template's BOS / system-prompt "
                                "handling)")
            group = _tokenize_group(ex, list(x), ys, max_length=max_length, overlength=overlength,
                                    max_responses=max_responses, min_responses=min_responses,
                                    drop_tied=drop_tied, report=report)
            if group is not None:
                groups.append(group)
    report.t0 = t0
    report.groups_kept = len(groups)
    report.responses_kept = sum(len(g.responses) for g in groups)
    return groups, report


def _tokenize_group(ex: Example, x: list[int], ys: list[list[int]], *, max_length: int, overlength: str,
                    max_responses: int | None, min_responses: int, drop_tied: bool,
                    report: DataReport) -> TokenizedGroup | None:
    """Apply the length and response-count policy to one group; None (counted) when it is dropped."""
    room = max_length - len(x)
    fits = [j for j, y in enumerate(ys) if len(y) <= room]
    if overlength == "error" and len(fits) < len(ys):
        j = next(j for j in range(len(ys)) if j not in fits)
        raise DataError(report.source, ex.where, f"responses[{j}]",
                        f"prompt + response is {len(x) + len(ys[j])} tokens, longer than max_length={max_length} "
                        "(data.overlength=error; use drop or truncate to keep going)")
    if room < 1:
        report.drop("group_prompt_overlength")
        return None
    if overlength == "drop":
        report.drop("response_overlength", len(ys) - len(fits))
        kept = fits
    else:
        kept = list(range(len(ys)))
    if ex.reference_answer is not None and ex.reference_answer not in kept:
        report.drop("group_lost_reference")
        return None
    if ex.rewards is None and min_responses >= 2 and ys and 0 not in kept:
        report.drop("group_lost_preferred")
        return None
    if max_responses is not None and len(kept) > max_responses:
        others = [j for j in kept if j != ex.reference_answer]
        budget = max_responses - (ex.reference_answer is not None)
        chosen = _select(others, ex.rewards, budget)
        chosen = sorted(chosen + ([ex.reference_answer] if ex.reference_answer is not None else []))
        report.drop("response_over_max_responses", len(kept) - len(chosen))
        kept = chosen
    if len(kept) < min_responses:
        report.drop("group_too_few_responses")
        return None
    rewards = [ex.rewards[j] for j in kept] if ex.rewards is not None else None
    if rewards is not None and min_responses >= 2 and len(set(rewards)) == 1:
        if drop_tied:
            report.drop("group_tied_rewards")
            return None
        report.tied_groups_kept += 1
    responses = []
    for j in kept:
        if len(ys[j]) > room:
            report.responses_truncated += 1
        responses.append(ys[j][:room])
    is_ref = [j == ex.reference_answer for j in kept] if ex.reference_answer is not None else None
    return TokenizedGroup(group_id=ex.row, prompt_ids=x, responses=responses, rewards=rewards,
                          is_reference=is_ref, row=ex.row)


def split_heldout(groups: Sequence[TokenizedGroup], fraction: float,
                  seed: int) -> tuple[list[TokenizedGroup], list[TokenizedGroup]]:
    """``(train, heldout)``: a seeded random ``fraction`` of the groups held out; both keep data order."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    n = len(groups)
    count = 0 if fraction == 0 else max(1, round(n * fraction))
    if count >= n and count > 0:
        raise ValueError(f"held-out fraction {fraction} of {n} groups leaves none to train on")
    held = set(np.random.default_rng(np.random.SeedSequence([seed % 2**63, n])).permutation(n)[:count].tolist())
    return ([g for i, g in enumerate(groups) if i not in held], [g for i, g in enumerate(groups) if i in held])


class ReferenceLookup(Protocol):
    """Precomputed reference log-probs by sequence key; a missing key raises a clear error."""

    def lookup(self, seq_keys: list[int]) -> tuple[list[float], list[float]]:
        """``(prompt_logps, response_logps)``, one each per key."""
        ...


class GroupBatcher:
    """Deterministic, resumable stream of per-DP-rank micro-batches of whole groups.

    A step takes ``global_batch_groups`` groups from the epoch's shuffle (seeded by ``(seed, epoch)``);
    rank r gets the r-th contiguous ``1/dp_size`` of them, in micro-batches of ``groups_per_micro_batch``
    groups, each ``groups_per_micro_batch * responses_per_group`` rows (PAD rows fill short groups).
    The last ``len(groups) % global_batch_groups`` groups of each shuffle sit the epoch out (drop_last,
    a different few each epoch): a step never holds one group twice, which would merge two copies into
    one group in the loss. The position is global, so resuming at another ``dp_size`` is exact too.
    """

    def __init__(self, groups: Sequence[TokenizedGroup], *, seq_length: int, pad_id: int,
                 groups_per_micro_batch: int, global_batch_groups: int, dp_rank: int = 0, dp_size: int = 1,
                 responses_per_group: int | None = None, seed: int = 0,
                 reference: ReferenceLookup | None = None):
        gpm, g, dp = groups_per_micro_batch, global_batch_groups, dp_size
        if min(gpm, g, dp) < 1 or g % (dp * gpm):
            raise ValueError(f"global_batch_groups={g} must split evenly over dp_size={dp} ranks of "
                             f"groups_per_micro_batch={gpm} (a positive multiple of {dp * gpm})")
        if not 0 <= dp_rank < dp:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp})")
        self.groups = list(groups)
        self.rows_per_group = responses_per_group or max((len(x.responses) for x in self.groups), default=1)
        for grp in self.groups:
            if len(grp.responses) > self.rows_per_group:
                raise ValueError(f"group {grp.group_id} has {len(grp.responses)} responses, more than "
                                 f"responses_per_group={self.rows_per_group}; set max_responses")
            longest = len(grp.prompt_ids) + max(len(y) for y in grp.responses)
            if longest > seq_length:
                raise ValueError(f"group {grp.group_id}: {longest} tokens exceed seq_length={seq_length}")
        scored = {grp.rewards is not None for grp in self.groups}
        if len(scored) > 1:
            raise ValueError("some groups have rewards and others do not")
        self.has_rewards = scored == {True}
        self.has_reference_flags = any(grp.is_reference is not None for grp in self.groups)
        self.seq_length, self.pad_id, self.seed, self.reference = seq_length, pad_id, seed, reference
        self.groups_per_micro_batch, self.global_batch_groups = gpm, g
        self.dp_rank, self.dp_size = dp_rank, dp
        self.micro_batches_per_step = g // (dp * gpm)
        self.epoch, self.index = 0, 0
        self._perm: tuple[int, np.ndarray] | None = None
        self._fp: str | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per pass over the groups (the remainder sits out; see the class docstring)."""
        return len(self.groups) // self.global_batch_groups

    @property
    def num_eval_microbatches(self) -> int:
        """Micro-batches each rank gets from :meth:`iter_eval_microbatches` (the same on every rank)."""
        return math.ceil(len(self.groups) / (self.dp_size * self.groups_per_micro_batch))

    def _fingerprint(self) -> str:
        """A hash of the groups' ids and sequences: resuming on other data would not be exact."""
        if self._fp is None:
            h = hashlib.blake2b(digest_size=8)
            for grp in self.groups:
                for y in grp.responses:
                    h.update(sequence_key(grp.prompt_ids, y).to_bytes(8, "little"))
                h.update(grp.group_id.to_bytes(8, "little", signed=True))
            self._fp = h.hexdigest()
        return self._fp

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed % 2**63, epoch]))
            self._perm = (epoch, rng.permutation(len(self.groups)))
        return self._perm[1]

    def next_step(self) -> list[dict[str, Tensor]]:
        """This rank's micro-batches for the next optimizer step."""
        if self.steps_per_epoch == 0:
            raise ValueError(f"only {len(self.groups)} groups, fewer than global_batch_groups="
                             f"{self.global_batch_groups}")
        if self.index >= self.steps_per_epoch * self.global_batch_groups:
            self.epoch, self.index = self.epoch + 1, 0
        step = self._order(self.epoch)[self.index:self.index + self.global_batch_groups]
        self.index += self.global_batch_groups
        per_rank = self.global_batch_groups // self.dp_size
        mine = step[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank].tolist()
        gpm = self.groups_per_micro_batch
        return [self._collate(mine[k * gpm:(k + 1) * gpm]) for k in range(self.micro_batches_per_step)]

    def iter_eval_microbatches(self) -> Iterator[dict[str, Tensor]]:
        """One pass over all groups in data order, no shuffle; every rank yields the same number of
        fixed-shape micro-batches (an empty tail is all PAD rows)."""
        gpm, dp = self.groups_per_micro_batch, self.dp_size
        for k in range(self.num_eval_microbatches):
            start = (k * dp + self.dp_rank) * gpm
            yield self._collate(list(range(start, min(start + gpm, len(self.groups)))))

    def _collate(self, indices: list[int]) -> dict[str, Tensor]:
        prompts, responses, gids, rewards, is_ref, keys = [], [], [], [], [], []
        for i in indices:
            grp = self.groups[i]
            for j, y in enumerate(grp.responses):
                prompts.append(grp.prompt_ids)
                responses.append(y)
                gids.append(grp.group_id)
                keys.append(sequence_key(grp.prompt_ids, y))
                if grp.rewards is not None:
                    rewards.append(grp.rewards[j])
                is_ref.append(bool(grp.is_reference[j]) if grp.is_reference is not None else False)
        ref_prompt = ref_response = None
        if self.reference is not None:
            ref_prompt, ref_response = self.reference.lookup(keys) if keys else ([], [])
        return collate_sequences(
            prompts, responses, seq_length=self.seq_length, pad_id=self.pad_id, group_ids=gids,
            rewards=rewards if self.has_rewards else None,
            is_reference_answer=is_ref if self.has_reference_flags else None,
            ref_logps=ref_response, ref_prompt_logps=ref_prompt, seq_keys=keys,
            num_rows=self.groups_per_micro_batch * self.rows_per_group)

    def state_dict(self) -> dict[str, int | str]:
        """The exact stream position (global: independent of the DP layout) plus a data fingerprint."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "global_batch_groups": self.global_batch_groups, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        """Resume at ``state``'s position; refuses a different seed, batch size or data."""
        now = {"seed": self.seed, "global_batch_groups": self.global_batch_groups,
               "fingerprint": self._fingerprint()}
        for key, mine in now.items():
            if state[key] != mine:
                raise ValueError(f"cannot resume the data stream exactly: checkpoint {key}={state[key]!r}, "
                                 f"now {mine!r} (the data, seed or global batch changed)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
