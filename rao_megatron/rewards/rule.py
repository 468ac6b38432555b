"""Rule-based reward functions and the ``module:function`` loader used by ``python -m rao_megatron.cli.annotate``.

A reward function is called once per response::

    def my_reward(prompt: str | list[dict], response: str) -> float: ...
    def my_reward(prompt, response, row: dict) -> float: ...       # also gets the raw data row

``prompt`` is the user's text when the prompt is a single user turn, else the list of
``{role, content}`` messages. A function that takes a ``row`` parameter also receives the raw input
row (for fields such as a gold ``answer``). A function marked with :func:`batched` is called once per
chunk instead: ``fn(prompts, responses, rows) -> list[float]``.

To reject a row (it goes to the side file with the reason), raise :class:`RowError` naming the field;
a ``ValueError`` or ``KeyError`` also rejects the row. A non-finite return value rejects the row too.
Any other exception is a bug in the function and stops the run (a rerun resumes where it stopped).
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

RewardFn = Callable[..., Any]
Prompt = str | list[dict[str, str]]


class RowError(ValueError):
    """A row the reward function cannot score; ``field`` names the offending field of the row."""

    def __init__(self, field: str | None, message: str) -> None:
        self.field = field
        super().__init__(message)


def batched(fn: RewardFn) -> RewardFn:
    """Mark ``fn(prompts, responses, rows) -> list[float]`` to be called once per chunk of responses."""
    fn.batched = True  # type: ignore[attr-defined]
    return fn


def load_reward_fn(spec: str) -> RewardFn:
    """Import ``package.module:function`` (the current directory is importable, as with ``python -m``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--reward-fn must look like package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--reward-fn {spec}: cannot import module {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--reward-fn {spec}: module {module_name!r} has no function {attr!r}")
    return fn


def wants_row(fn: RewardFn) -> bool:
    """Whether ``fn`` takes a ``row`` argument (the raw data row)."""
    try:
        return "row" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def user_text(prompt: Prompt) -> str:
    """The text of the last user turn of ``prompt`` (the prompt itself when it is a string)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


_ASKED_LETTER = re.compile(r"\bletter\s+['\"]?([A-Za-z])\b")


def letter_share(prompt: Prompt, response: str) -> float:
    """Share of the asked letter among the response's non-space characters (the tiny letter task).

    ``"Repeat the letter g."`` / ``"cggfggg"`` -> 5/7. This is the reward of ``examples/data/tiny_groups.jsonl``.
    """
    match = _ASKED_LETTER.search(user_text(prompt))
    if match is None:
        raise RowError("prompt", "asks for no letter ('... the letter x ...')")
    chars = [c for c in response if not c.isspace()]
    if not chars:
        raise RowError("responses", "empty response")
    return sum(c == match.group(1) for c in chars) / len(chars)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_FINAL_MARKERS = (re.compile(r"####\s*(.+)"), re.compile(r"\\boxed\{([^}]*)\}"),
                  re.compile(r"answer\s*(?:is|:)\s*(.+)", re.IGNORECASE))


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def extract_final_number(text: str) -> float | None:
    """The final numeric answer of a solution: after ``####``, in ``\\boxed{}``, after "answer is", else the last number."""
    for marker in _FINAL_MARKERS:
        found = marker.findall(text)
        if found:
            numbers = _NUMBER.findall(found[-1])
            if numbers:
                return _to_number(numbers[0])
    numbers = _NUMBER.findall(text)
    return _to_number(numbers[-1]) if numbers else None


def exact_final_number(prompt: Prompt, response: str, row: Mapping[str, Any]) -> float:
    """1.0 if the response's final number equals the row's ``answer``, else 0.0 (GSM8K-style).

    The row needs an ``answer`` field: a number, or a GSM8K solution ending in ``#### 72``.
    """
    if row.get("answer") is None:
        raise RowError("answer", "missing (exact_final_number compares with the row's gold answer)")
    raw = row["answer"]
    gold = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else \
        extract_final_number(str(raw))
    if gold is None or not math.isfinite(gold):
        raise RowError("answer", f"holds no number: {raw!r}")
    got = extract_final_number(response)
    return float(got is not None and math.isclose(got, gold, rel_tol=0.0, abs_tol=1e-6))
