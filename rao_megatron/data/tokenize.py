"""Normalised examples -> tokenized groups: chat template, end-of-turn, t0 check, length policy, drop report."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from .errors import DataError, DataReport
from .formats import Example

OVERLENGTH = ("drop", "truncate", "error")
#: what to do with row text that spells a special token (``data.special_tokens_in_text``)
SPECIAL_TOKENS_IN_TEXT = ("warn", "refuse")
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


def special_token_pattern(tokenizer: PreTrainedTokenizerBase) -> re.Pattern | None:
    """A regex matching the tokenizer's special tokens (bos / eos / pad, chat-template control tokens such as
    ``<|im_end|>``): text that spells one is tokenized as that control token, not as the characters."""
    tokens = {t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str) and t}
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False) and added.content:
            tokens.add(added.content)
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _special_token_in(ex: Example, pattern: re.Pattern) -> tuple[str, str] | None:
    """``(field, token)`` of the first text of ``ex`` that spells a special token, else None."""
    texts = [("prompt", m["content"]) for m in ex.prompt]
    texts += [("reference" if j == ex.reference_answer else f"responses[{j}]", y) for j, y in enumerate(ex.responses)]
    for name, text in texts:
        m = pattern.search(text)
        if m:
            return name, m.group(0)
    return None


def check_special_tokens(report: DataReport, policy: str) -> None:
    """Apply ``data.special_tokens_in_text`` to a data report: ``refuse`` raises a :class:`DataError` naming the
    first row, field and token; ``warn`` leaves the count and that row to ``report.summary()``."""
    if policy not in SPECIAL_TOKENS_IN_TEXT:
        raise ValueError(f"special_tokens_in_text must be one of {SPECIAL_TOKENS_IN_TEXT}, got {policy!r}")
    if policy == "refuse" and report.special_token_rows and report.special_token_first:
        where, field, token = report.special_token_first
        raise DataError(report.source, where, field, f"spells the tokenizer's special token {token!r}, which "
                        f"the tokenizer would turn into that control token ({report.special_token_rows} rows do; "
                        "data.special_tokens_in_text=refuse; use warn to train on them as they are)")


def _render_prompt(tokenizer: PreTrainedTokenizerBase, ex: Example, source: str) -> str:
    """The prompt through the chat template; a template that refuses it (jinja's raise_exception: roles
    out of order, a system turn it does not support) is a :class:`DataError` naming the row."""
    try:
        return tokenizer.apply_chat_template(ex.prompt, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja2's TemplateError and whatever a template raises
        raise DataError(source, ex.where, "prompt", f"the chat template refuses it: {e}") from None


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
    :class:`DataError`. ``min_responses`` is 2 for pairwise losses. ``drop_tied``: a group whose rewards all
    tie (one response included: no ranking either) is dropped. Every drop is counted in the report.
    """
    if overlength not in OVERLENGTH:
        raise ValueError(f"overlength must be one of {OVERLENGTH}, got {overlength!r}")
    if min_responses < 1:
        raise ValueError(f"min_responses must be >= 1, got {min_responses}")
    if max_responses is not None and max_responses < min_responses:
        raise ValueError(f"max_responses={max_responses} is below min_responses={min_responses}")
    report = DataReport(source=source, rows_read=sum(ex.rows for ex in examples), max_length=max_length)
    if not examples:
        return [], report
    eot = end_of_turn_ids(tokenizer)
    specials = special_token_pattern(tokenizer)
    scored = examples[0].rewards is not None
    t0_where = "the caller (the training data's t0)"
    groups: list[TokenizedGroup] = []
    for start in range(0, len(examples), chunk_size):
        chunk = examples[start:start + chunk_size]
        prompt_texts = [_render_prompt(tokenizer, ex, source) for ex in chunk]
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
            found = _special_token_in(ex, specials) if specials is not None else None
            if found is not None:
                report.special_token_rows += ex.rows
                if report.special_token_first is None:
                    report.special_token_first = [ex.where, *found]
            report.shortest_prompt = min(len(x), report.shortest_prompt or len(x))
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
    if rewards is not None and (min_responses >= 2 or drop_tied) and len(set(rewards)) == 1:
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
