"""Prompt rows: parsing and checking the input of generation and evaluation, and tokenizing the prompts.

A row (JSONL, Parquet or a saved `datasets` directory) has ``prompt`` (a string: one user turn through
the tokenizer's chat template; or a list of messages) or ``messages`` (a chat list; a final assistant
turn is dropped from the prompt and kept as ``reference``), an optional ``id`` (default: the row index)
and any other fields (``answer``, ...), which are passed through. Input ``responses`` / ``rewards`` /
``sampling`` are dropped (a generation run replaces them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import DataError, row_label
from .formats import iter_raw_rows

#: input fields the output replaces (the rest of the row is passed through)
REPLACED_FIELDS = ("responses", "rewards", "sampling")
Message = dict[str, str]


@dataclass
class Prompt:
    """One input row, normalised: its id, the chat prompt and the output row without responses."""

    id: Any
    messages: list[Message]          # the chat prompt (ends before the assistant turn)
    row: dict[str, Any] = field(default_factory=dict)  # id, prompt | messages, passthrough, reference

    @property
    def key(self) -> str:
        return id_key(self.id)


def id_key(value: Any) -> str:
    """A prompt id as a comparable key (1 and "1" are different ids)."""
    return json.dumps(value)


def _messages(value: Any, err: Callable[[str, str], DataError], name: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise err(name, "expected a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise err(f"{name}[{i}]", "expected a {role: str, content: str} message")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def parse_prompt_row(raw: Any, *, index: int, source: str, where: str) -> Prompt:
    """Normalise one input row; a malformed one raises :class:`DataError` naming file, row and field."""
    def err(name: str | None, message: str) -> DataError:
        return DataError(source, where, name, message)

    if not isinstance(raw, Mapping):
        raise err(None, f"expected a JSON object, got {type(raw).__name__}")
    pid = raw.get("id", index)
    if pid is None:
        pid = index
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise err("id", f"expected a string or an integer, got {type(pid).__name__} {pid!r}")
    out: dict[str, Any] = {"id": pid}
    reference = None
    if raw.get("prompt") is not None:
        value = raw["prompt"]
        if isinstance(value, str):
            if not value.strip():
                raise err("prompt", "empty string")
            messages = [{"role": "user", "content": value}]
        else:
            messages = _messages(value, err, "prompt")
            if messages[-1]["role"] == "assistant":
                raise err("prompt", "the prompt must end before the assistant turn (last message is 'assistant')")
        out["prompt"] = value
    elif raw.get("messages") is not None:
        messages = _messages(raw["messages"], err, "messages")
        if messages[-1]["role"] == "assistant":
            messages, reference = messages[:-1], messages[-1]["content"]
            if raw.get("reference") is not None:
                raise err("reference", "the row has both a reference and a final assistant turn in 'messages'")
            if not messages:
                raise err("messages", "empty prompt: the conversation is only an assistant turn")
            if messages[-1]["role"] == "assistant":
                raise err("messages", "two assistant turns at the end: the prompt must end before an assistant turn")
        out["messages"] = messages
    else:
        raise err("prompt", "missing: a row needs 'prompt' (a string) or 'messages' (a chat list)")
    for k, v in raw.items():
        if k not in out and k not in ("prompt", "messages", "id") and k not in REPLACED_FIELDS:
            out[k] = v
    if reference is not None:
        out["reference"] = reference
    return Prompt(id=pid, messages=messages, row=out)


def read_prompts(path: str | os.PathLike, *, limit: int | None = None, split: str = "train") -> list[Prompt]:
    """Every row of a JSONL / Parquet / saved-dataset file as a :class:`Prompt` (ids checked unique)."""
    source = str(path)
    prompts: list[Prompt] = []
    for index, (row, one_based, raw) in enumerate(iter_raw_rows(source, split=split)):
        if limit is not None and index >= limit:
            break
        prompts.append(parse_prompt_row(raw, index=index, source=source, where=row_label(row, one_based_line=one_based)))
    if not prompts:
        raise DataError(source, None, None, "no prompts")
    check_unique_prompts(prompts, source)
    return prompts


def check_unique_prompts(prompts: Sequence[Prompt], source: str) -> None:
    """A repeated prompt id raises :class:`DataError` naming both rows (resume and evaluation join on ids)."""
    seen: dict[str, int] = {}
    for i, p in enumerate(prompts):
        if p.key in seen:
            raise DataError(source, f"row {i} (0-based)", "id",
                            f"duplicate id {p.id!r} (also row {seen[p.key]}): ids must be unique (resume and "
                            "evaluation join on them)")
        seen[p.key] = i


def prompt_token_ids(tokenizer: Any, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Chat-template token ids with the generation prompt, tokenized as for training (no extra specials)."""
    texts = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False) for p in prompts]
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
