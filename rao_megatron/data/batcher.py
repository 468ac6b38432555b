"""Tokenized groups -> deterministic, resumable per-DP-rank micro-batches (with precomputed reference log-probs)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
from torch import Tensor

from .collate import collate_sequences, sequence_key
from .packing import GroupTooLargeError, collate_packed, empty_packed, layout_summary, plan_micro_batches
from .tokenize import TokenizedGroup

#: groups whose planned layouts decide between one prompt per response and shared prompts (the first ones)
LAYOUT_SAMPLE = 512


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

    With ``packing``, a rank's groups of the step are packed (:mod:`.packing`) into micro-batches of
    ``packed_rows`` rows (default: the padded layout's ``groups_per_micro_batch * responses_per_group``),
    so the number of micro-batches follows the tokens, not the group count, and may differ between DP
    ranks (each rank's schedule runs its own; gradients meet once per step).

    ``shared_prompt`` (packed only): each group of two or more responses is laid out as one unit, its prompt
    once and then every response (:func:`~.packing.collate_packed`), in rows of ``row_tokens`` tokens (a
    multiple of ``seq_length`` that holds the largest group as one unit, at most a whole micro-batch), as many
    as fit a micro-batch's ``packed_rows x seq_length`` token slots. The per-sequence tensors and their order
    do not change. None: whichever layout -- one prompt per response or shared, and the row length -- costs
    least on the data (:meth:`_choose_layout`; ``layout_hidden``, the model's hidden size, weighs the
    attention's cost, which grows with the row); True: shared, at the cheapest row length.

    ``equal_micro_batches`` (expert parallelism: the MoE token dispatcher runs collectives across DP ranks
    inside every forward, so a rank with one forward more would wait forever) gives every DP rank the same
    number of packed micro-batches in each step and eval pass: every rank plans every rank's share (lengths
    only, and the step's groups are known to all, so no collective) and fills its own list up to the most
    with all-padding micro-batches, which the loss skips. Off elsewhere: padding costs forwards.
    """

    def __init__(self, groups: Sequence[TokenizedGroup], *, seq_length: int, pad_id: int,
                 groups_per_micro_batch: int, global_batch_groups: int, dp_rank: int = 0, dp_size: int = 1,
                 responses_per_group: int | None = None, seed: int = 0,
                 reference: ReferenceLookup | None = None, packing: bool = False,
                 packed_rows: int | None = None, equal_micro_batches: bool = False,
                 shared_prompt: bool | None = False, layout_hidden: int | None = None):
        gpm, g, dp = groups_per_micro_batch, global_batch_groups, dp_size
        unit = dp if packing else dp * gpm
        if min(gpm, g, dp) < 1 or g % unit:
            per = f"dp_size={dp} ranks" + ("" if packing else f" of groups_per_micro_batch={gpm}")
            raise ValueError(f"global_batch_groups={g} must split evenly over {per} (a positive multiple of {unit})")
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
        self.packing = packing
        self.equal_micro_batches = equal_micro_batches  # padded layouts are equal on every rank already
        self.packed_rows = packed_rows or gpm * self.rows_per_group
        # a packed micro-batch: rows x row_tokens (the shared-prompt layout may take longer, fewer rows)
        self.shared_prompt, self.row_tokens, self.rows = False, seq_length, self.packed_rows
        self.shared_prompt_asked = shared_prompt if packing else False
        if packing and shared_prompt is not False:
            self.shared_prompt, self.row_tokens, self.rows = self._choose_layout(shared_prompt, layout_hidden)
        if packing:  # refuse a group that can never fit, naming its row, before training starts
            for grp in self.groups:
                try:
                    plan_micro_batches([self._unit_lengths(grp)], rows=self.rows, seq_length=self.row_tokens)
                except GroupTooLargeError as e:
                    raise GroupTooLargeError(f"row {grp.row}: {str(e).split(': ', 1)[1]}") from None
        self.epoch, self.index = 0, 0
        self._perm: tuple[int, np.ndarray] | None = None
        self._fp: str | None = None
        self._eval_count: int | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per pass over the groups (the remainder sits out; see the class docstring)."""
        return len(self.groups) // self.global_batch_groups

    @property
    def num_eval_microbatches(self) -> int:
        """Micro-batches this rank gets from :meth:`iter_eval_microbatches` (padded or ``equal_micro_batches``:
        the same on every rank)."""
        if self.packing:
            return self._eval_plans()[2]
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
        shares = [step[r * per_rank:(r + 1) * per_rank].tolist() for r in range(self.dp_size)]
        mine = shares[self.dp_rank]
        if self.packing:
            plans = self._plan(mine)
            padding = self._most_micro_batches(shares, len(plans)) - len(plans)
            return [self._collate_packed(mine, plan) for plan in plans] + [self._padding() for _ in range(padding)]
        gpm = self.groups_per_micro_batch
        return [self._collate(mine[k * gpm:(k + 1) * gpm]) for k in range(self.micro_batches_per_step)]

    def iter_eval_microbatches(self) -> Iterator[dict[str, Tensor]]:
        """One pass over all groups in data order, no shuffle. Padded: every rank yields the same number of
        fixed-shape micro-batches (an empty tail is all PAD rows); packed: this rank's share of the groups,
        packed (at least one micro-batch, all padding if the share is empty; with ``equal_micro_batches``
        padded up to the most any rank gets)."""
        if self.packing:
            mine, plans, count = self._eval_plans()
            for plan in plans:
                yield self._collate_packed(mine, plan)
            for _ in range(count - len(plans)):
                yield self._padding()
            return
        gpm, dp = self.groups_per_micro_batch, self.dp_size
        for k in range(self.num_eval_microbatches):
            start = (k * dp + self.dp_rank) * gpm
            yield self._collate(list(range(start, min(start + gpm, len(self.groups)))))

    def _eval_share(self, rank: int) -> list[int]:
        return list(range(rank, len(self.groups), self.dp_size))

    def _eval_plans(self) -> tuple[list[int], list[list[list[tuple[int, int]]]], int]:
        """This rank's eval share, its packed plan, and how many micro-batches it yields (counted once:
        planning every rank's share of a large set costs seconds)."""
        mine = self._eval_share(self.dp_rank)
        plans = self._plan(mine)
        if self._eval_count is None:
            shares = [self._eval_share(r) for r in range(self.dp_size)]
            self._eval_count = max(1, self._most_micro_batches(shares, len(plans)))
        return mine, plans, self._eval_count

    def _most_micro_batches(self, shares: list[list[int]], own: int) -> int:
        """With ``equal_micro_batches``: the most packed micro-batches any DP rank's share of ``shares`` takes
        (``own``: this rank's, already planned); else ``own``."""
        if not self.equal_micro_batches:
            return own
        return max([own] + [len(self._plan(share)) for r, share in enumerate(shares) if r != self.dp_rank])

    def _padding(self) -> dict[str, Tensor]:
        """An all-padding packed micro-batch with the real ones' per-sequence columns (empty): the loss skips
        it, and code that reads ``seq_keys`` or ``ref_logps`` of every micro-batch finds them."""
        columns = self._columns([])
        for key in ("prompts", "responses", "group_ids"):
            columns.pop(key)
        return empty_packed(self.rows, self.row_tokens, self.pad_id, **columns)

    def layout_line(self) -> str:
        """The start-up report's line on how the micro-batches are laid out (:func:`~.packing.layout_summary`),
        with the shared prompts' saving."""
        line = layout_summary([[len(g.prompt_ids) + len(y) for y in g.responses] for g in self.groups],
                              seq_length=self.seq_length, rows=self.packed_rows, packing=self.packing)
        if not self.shared_prompt:
            if self.shared_prompt_asked is None and any(len(g.responses) > 1 for g in self.groups):
                return f"{line}; shared prompt: not used (one prompt per response costs less on this data)"
            return line
        shared = [g for g in self.groups if self._is_shared(g)]
        tokens = sum(len(g.prompt_ids) * len(g.responses) + sum(map(len, g.responses)) for g in shared)
        placed = sum(self._unit_tokens(g) for g in shared)
        return (f"{line}; shared prompt: {len(shared)} of {len(self.groups)} groups hold their prompt once "
                f"(rows of {self.row_tokens} tokens, {self.rows} per micro-batch; "
                f"{tokens / max(placed, 1):.2f}x fewer tokens than one prompt per response)")

    def _choose_layout(self, mode: bool | None, hidden: int | None) -> tuple[bool, int, int]:
        """``(shared, row_tokens, rows)``: the candidate layout (``mode`` None: one prompt per response, or shared
        in rows of any multiple of ``seq_length`` that holds the largest group; True: the shared ones) with the
        least estimated work over the first ``LAYOUT_SAMPLE`` groups, planned a step's share at a time.

        Work per micro-batch: its token slots x (1 + row_tokens / (6 x hidden)), the linear layers' ~24 H^2
        FLOPs per token plus attention's ~4 H x row (an explicit mask: every row attends over its whole length);
        without ``hidden`` the shortest shared rows only, weighed by slots. The first on ties: one prompt per
        response, then shorter rows. A layout in which a group fits no micro-batch is never chosen.
        """
        seq, rows = self.seq_length, self.packed_rows
        widest = max((self._unit_tokens(g) for g in self.groups if len(g.responses) > 1), default=0)
        unshared = (False, seq, rows)
        if widest == 0:
            return unshared
        first = min(max(1, math.ceil(widest / seq)), rows)
        lengths = range(first, rows + 1) if hidden else [first]
        options = [(True, m * seq, rows // m) for m in lengths]
        if mode is None:
            options.insert(0, unshared)
        if len(options) == 1:
            return options[0]
        sample = self.groups[:LAYOUT_SAMPLE]
        share = max(1, self.global_batch_groups // self.dp_size)

        def cost(option: tuple[bool, int, int]) -> float:
            shared, row_tokens, n_rows = option
            per_batch = n_rows * row_tokens * (1 + row_tokens / (6 * hidden) if hidden else 1)
            try:
                return per_batch * sum(
                    len(plan_micro_batches([self._lengths(g, shared, row_tokens) for g in sample[i:i + share]],
                                           rows=n_rows, seq_length=row_tokens))
                    for i in range(0, len(sample), share))
            except GroupTooLargeError:
                return math.inf

        return min(options, key=cost)

    @staticmethod
    def _unit_tokens(grp: TokenizedGroup) -> int:
        """A group's tokens in the shared-prompt layout: the prompt once, then every response."""
        return len(grp.prompt_ids) + sum(len(y) for y in grp.responses)

    def _is_shared(self, grp: TokenizedGroup) -> bool:
        return self._shares(grp, self.shared_prompt, self.row_tokens)

    def _shares(self, grp: TokenizedGroup, shared: bool, row_tokens: int) -> bool:
        return shared and len(grp.responses) > 1 and self._unit_tokens(grp) <= row_tokens

    def _lengths(self, grp: TokenizedGroup, shared: bool, row_tokens: int) -> list[int]:
        """What packing places of a group: one shared unit, or each sequence."""
        if self._shares(grp, shared, row_tokens):
            return [self._unit_tokens(grp)]
        return [len(grp.prompt_ids) + len(y) for y in grp.responses]

    def _unit_lengths(self, grp: TokenizedGroup) -> list[int]:
        return self._lengths(grp, self.shared_prompt, self.row_tokens)

    def _plan(self, indices: list[int]) -> list[list[list[tuple[int, int]]]]:
        """Packed micro-batches of the groups ``indices``: rows of (position in ``indices``, response), where a
        shared group's one unit is response 0."""
        lengths = [self._unit_lengths(self.groups[i]) for i in indices]
        return plan_micro_batches(lengths, rows=self.rows, seq_length=self.row_tokens)

    def _collate_packed(self, indices: list[int], plan: list[list[tuple[int, int]]]) -> dict[str, Tensor]:
        """One packed micro-batch of ``plan`` (from :meth:`_plan` over ``indices``)."""
        def members(g: int, j: int) -> list[tuple[int, int]]:
            grp = self.groups[indices[g]]
            return [(g, k) for k in range(len(grp.responses))] if self._is_shared(grp) else [(g, j)]

        # the columns in data order (groups whole, responses as given: pairs without rewards are chosen-first)
        sequences = sorted(gk for row in plan for g, j in row for gk in members(g, j))
        number = {gj: n for n, gj in enumerate(sequences)}
        columns = self._columns([(indices[g], j) for g, j in sequences])
        placement = [[tuple(number[gk] for gk in members(g, j)) if self._is_shared(self.groups[indices[g]])
                      else number[(g, j)] for g, j in row] for row in plan]
        prompts, responses, gids = columns.pop("prompts"), columns.pop("responses"), columns.pop("group_ids")
        return collate_packed(prompts, responses, placement=placement, seq_length=self.row_tokens,
                              pad_id=self.pad_id, group_ids=gids, **columns)

    def _columns(self, sequences: list[tuple[int, int]]) -> dict[str, list | None]:
        """Per-sequence columns of the ``(group index, response index)`` sequences, in that order."""
        prompts, responses, gids, rewards, is_ref, keys = [], [], [], [], [], []
        for i, j in sequences:
            grp = self.groups[i]
            y = grp.responses[j]
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
        return {"prompts": prompts, "responses": responses, "group_ids": gids,
                "rewards": rewards if self.has_rewards else None,
                "is_reference_answer": is_ref if self.has_reference_flags else None,
                "ref_logps": ref_response, "ref_prompt_logps": ref_prompt, "seq_keys": keys}

    def _collate(self, indices: list[int]) -> dict[str, Tensor]:
        """One padded micro-batch of the groups ``indices``: one sequence per row, PAD rows to a fixed count."""
        columns = self._columns([(i, j) for i in indices for j in range(len(self.groups[i].responses))])
        prompts, responses, gids = columns.pop("prompts"), columns.pop("responses"), columns.pop("group_ids")
        return collate_sequences(prompts, responses, seq_length=self.seq_length, pad_id=self.pad_id,
                                 group_ids=gids, num_rows=self.groups_per_micro_batch * self.rows_per_group,
                                 **columns)

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
