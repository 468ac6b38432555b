"""Read preference / SFT rows from JSONL, Parquet or `datasets`, and normalise them into :class:`Example`.

Row formats (detected from the first row's fields, or forced with ``format=``):

- ``group``: ``{prompt: str | messages: [...], responses: [str], rewards?: [float], reference?: str,
  reference_reward?: float}`` — the project's own format; ``reference`` is GRAO's reference answer,
  appended after the responses.
- ``pair``: ``{prompt?, chosen, rejected, score_chosen?, score_rejected?}`` — every TRL preference form:
  standard (strings) or conversational (message lists), with an explicit ``prompt`` (chosen / rejected
  are then the completion: a string or one assistant turn) or an implicit one (chosen / rejected are
  whole conversations whose turns before the last assistant turn are the prompt, as in
  ``ultrafeedback_binarized``; for strings, the text they share at the start, as TRL's
  ``extract_prompt`` takes it). Chosen first. A conversation whose turns before its last assistant
  turn differ from ``prompt`` (or from the other's) is an error naming the field.
- ``unpaired``: TRL's unpaired preference ``{prompt, completion, label: bool}`` (KTO): the rows of one
  prompt (anywhere in the file) become one group, in file order, with rewards 1.0 (true) / 0.0 (false).
  A prompt whose rows all carry one label is a group with equal rewards: pointwise losses (RAO, SFT)
  train on it, pairwise losses drop it and count it (no preference pair).
- ``ultrafeedback``: raw UltraFeedback ``{instruction, completions: [{response, overall_score,
  annotations: {aspect: {Rating}}}]}``.
- ``sft``: ``{messages: [...]}`` (UltraChat): the last assistant turn is the response; also TRL's
  prompt-completion rows ``{prompt, completion}`` (``prompt_completion``).

TRL's prompt-only rows ``{prompt}`` are the input of ``generate`` / ``online`` (:mod:`.prompts`); as
training data they are refused with that advice. Message roles must be ones the chat template accepts
(``roles=``, from :func:`rao_megatron.data.tokenizer.template_roles`; :data:`KNOWN_ROLES` without one).
Rewards must be finite and at most :data:`MAX_ABS_REWARD` in magnitude.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import DataError, row_label

FORMATS = ("group", "pair", "unpaired", "ultrafeedback", "sft", "prompt_completion")
REWARD_FIELDS = ("overall", "fine_grained")
Kind = Literal["group", "pair", "sft"]
Message = dict[str, str]

#: roles accepted without a chat template to ask (annotation with a rule function, evaluation)
KNOWN_ROLES = frozenset({"system", "user", "assistant", "tool"})
#: the largest |reward| accepted. Real rewards are ratings (1-10), reward-model scores (about ±20) or 0/1
#: rule rewards; a value beyond 1e6 is an id, a timestamp or a sentinel (1e300), and in the fp32 losses
#: its square (RAO, RPO) overflows at about 1.8e19 — the run would die steps later naming no row.
MAX_ABS_REWARD = 1e6


@dataclass
class Example:
    """One normalised row: a chat prompt and its responses (with rewards, if the data has them)."""

    row: int                        # JSONL line (1-based); Parquet / `datasets` / data-directory index (0-based)
    where: str                      # row_label(row): how error messages name this row
    prompt: list[Message]           # chat messages up to (excluding) the assistant turn
    responses: list[str]
    rewards: list[float] | None
    reference_answer: int | None    # index into responses of GRAO's reference answer
    kind: Kind
    unrated: int = 0                # responses left out for lack of a rating (counted in the DataReport)
    rows: int = 1                   # input rows behind it (unpaired rows of one prompt are merged)


def _number_text(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    return repr(value)


def check_reward(value: Any) -> float:
    """``value`` as a float reward; ValueError (saying what is wrong) unless finite and within ±MAX_ABS_REWARD."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {type(value).__name__} {value!r}")
    try:
        x = float(value)
    except OverflowError:
        raise ValueError(f"expected a finite number, got {_number_text(value)}") from None
    if not math.isfinite(x):
        raise ValueError(f"expected a finite number, got {x}")
    if abs(x) > MAX_ABS_REWARD:
        raise ValueError(f"|reward| must be at most {MAX_ABS_REWARD:g}, got {x:g} (rewards feed fp32 losses; a "
                         "value this large is an id, a timestamp or a sentinel: fix the row or rescale the data)")
    return x


class _Row:
    """Field access on one raw row that raises :class:`DataError` naming file, row and field."""

    def __init__(self, data: Any, source: str, where: str, roles: Collection[str] = KNOWN_ROLES):
        self.source, self.where, self.roles = source, where, roles
        if not isinstance(data, Mapping):
            raise DataError(source, where, None, f"expected a JSON object, got {type(data).__name__}")
        self.data = data

    def error(self, field: str | None, message: str) -> DataError:
        return DataError(self.source, self.where, field, message)

    def has(self, name: str) -> bool:
        # Parquet fills absent columns with None, so None counts as absent everywhere.
        return self.data.get(name) is not None

    def get(self, name: str) -> Any:
        if not self.has(name):
            raise self.error(name, "missing")
        return self.data[name]

    def text(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {type(value).__name__}")
        if not value.strip():
            raise self.error(field, "empty string")
        return value

    def number(self, value: Any, field: str) -> float:
        # bool is an int subclass; a True reward is almost certainly a data bug
        try:
            return check_reward(value)
        except ValueError as e:
            raise self.error(field, str(e)) from None

    def messages(self, value: Any, field: str) -> list[Message]:
        if not isinstance(value, list) or not value:
            raise self.error(field, "expected a non-empty list of {role, content} messages")
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                raise self.error(f"{field}[{i}]", "expected a {role: str, content: str} message")
            if m["role"] not in self.roles:
                raise self.error(f"{field}[{i}].role", f"role {m['role']!r} is not one the chat template accepts "
                                 f"({', '.join(sorted(self.roles))})")
            out.append({"role": m["role"], "content": self.text(m.get("content"), f"{field}[{i}].content")})
        return out

    def prompt(self, field: str) -> list[Message]:
        value = self.get(field)
        if isinstance(value, str):
            return [{"role": "user", "content": self.text(value, field)}]
        msgs = self.messages(value, field)
        if msgs[-1]["role"] == "assistant":
            raise self.error(field, "the prompt must end before the assistant turn (last message is 'assistant')")
        return msgs

    def split_conversation(self, field: str) -> tuple[list[Message], str]:
        """(messages before the last assistant turn, that turn's content) of a conversation field."""
        context, answer = self.completion(field)
        if not context:
            raise self.error(field, "empty prompt: the conversation starts with the assistant turn")
        return context, answer

    def completion(self, field: str) -> tuple[list[Message], str]:
        """(turns before the response, the response) of a completion field.

        A string is the response alone (no turns before it). A message list must end with an assistant
        turn: one assistant message alone is TRL's explicit-prompt completion; a longer list is a
        conversation whose turns before the last one are its prompt.
        """
        value = self.get(field)
        if isinstance(value, str):
            return [], self.text(value, field)
        msgs = self.messages(value, field)
        if msgs[-1]["role"] != "assistant":
            if any(m["role"] == "assistant" for m in msgs):
                raise self.error(field, f"the conversation goes on after its last assistant turn (last message is "
                                 f"'{msgs[-1]['role']}'): the response must be the final turn")
            raise self.error(field, "the conversation has no assistant turn")
        if len(msgs) > 1 and msgs[-2]["role"] == "assistant":
            raise self.error(field, "two assistant turns at the end: a response is one assistant turn")
        return msgs[:-1], msgs[-1]["content"]


def same_prompt(a: list[Message], b: list[Message]) -> bool:
    """Equal turns (roles equal, contents equal up to surrounding whitespace)."""
    return len(a) == len(b) and all(x["role"] == y["role"] and x["content"].strip() == y["content"].strip()
                                    for x, y in zip(a, b))


def detect_format(fields: Mapping[str, Any]) -> str:
    """Name of the row format implied by a row's (non-null) fields, or '' when none fits.

    ``prompt_only`` (TRL's prompt-only rows, generation input) is named so that the error can say so;
    it is not a training format.
    """
    present = {k for k, v in fields.items() if v is not None}
    if {"instruction", "completions"} <= present:
        return "ultrafeedback"
    if {"chosen", "rejected"} <= present:
        return "pair"
    if {"completion", "label"} <= present:
        return "unpaired"
    if "completion" in present:
        return "prompt_completion"
    if "responses" in present or "reference" in present:
        return "group"
    if "messages" in present:
        return "sft"
    if "prompt" in present:
        return "prompt_only"
    return ""


def _group(r: _Row) -> tuple[list[Message], list[str], list[float] | None, int | None]:
    prompt = r.prompt("prompt" if r.has("prompt") or not r.has("messages") else "messages")
    responses_raw = r.get("responses") if r.has("responses") or not r.has("reference") else []
    if not isinstance(responses_raw, list) or (not responses_raw and not r.has("reference")):
        raise r.error("responses", "expected a non-empty list of strings")
    responses = [r.text(v, f"responses[{i}]") for i, v in enumerate(responses_raw)]
    rewards = None
    if r.has("rewards"):
        raw = r.get("rewards")
        if not isinstance(raw, list) or len(raw) != len(responses):
            got = len(raw) if isinstance(raw, list) else type(raw).__name__
            raise r.error("rewards", f"expected {len(responses)} numbers (one per response), got {got}")
        rewards = [r.number(v, f"rewards[{i}]") for i, v in enumerate(raw)]
    reference = None
    if r.has("reference"):
        responses.append(r.text(r.get("reference"), "reference"))
        reference = len(responses) - 1
        if rewards is not None:
            # GRAO normalises advantages over the group including the reference, so it needs a reward
            rewards.append(r.number(r.get("reference_reward"), "reference_reward"))
    return prompt, responses, rewards, reference


def _implicit_string_prompt(r: _Row, chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's standard implicit prompt: the text chosen and rejected share at the start (a space before the
    first difference goes to the completions, as TRL's ``extract_prompt`` does)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n and chosen[n - 1] == " ":
        n -= 1
    prompt = chosen[:n]
    if not prompt.strip():
        raise r.error("prompt", "missing, and 'chosen' and 'rejected' share no leading text to take as the "
                      "implicit prompt (TRL's standard implicit-prompt format)")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text[n:].strip():
            raise r.error(name, "empty once the implicit prompt (the text it shares with the other) is removed")
    return prompt, chosen[n:], rejected[n:]


def _pair(r: _Row) -> tuple[list[Message], list[str], list[float] | None]:
    explicit = r.prompt("prompt") if r.has("prompt") else None
    prompt, implied_by, responses = explicit, "prompt", []
    for name in ("chosen", "rejected"):
        context, answer = r.completion(name)
        responses.append(answer)
        if not context:
            continue
        if prompt is None:
            prompt, implied_by = context, name
        elif not same_prompt(context, prompt):
            raise r.error(name, f"its conversation before the last assistant turn differs from '{implied_by}'")
    if prompt is None:
        if isinstance(r.data["chosen"], str) and isinstance(r.data["rejected"], str):
            text, chosen, rejected = _implicit_string_prompt(r, responses[0], responses[1])
            prompt, responses = [{"role": "user", "content": text}], [chosen, rejected]
        else:
            raise r.error("prompt", "missing: 'chosen' / 'rejected' hold only the assistant turn, so the row needs "
                          "an explicit 'prompt'")
    rewards = None
    if r.has("score_chosen") or r.has("score_rejected"):
        rewards = [r.number(r.get(f), f) for f in ("score_chosen", "score_rejected")]
    return prompt, responses, rewards


def _prompt_and_completion(r: _Row) -> tuple[list[Message], str]:
    """TRL's prompt-completion / unpaired rows: ``prompt`` (explicit) and ``completion``."""
    prompt = r.prompt("prompt")
    context, answer = r.completion("completion")
    if context and not same_prompt(context, prompt):
        raise r.error("completion", "its conversation before the last assistant turn differs from 'prompt'")
    return prompt, answer


def _label(r: _Row) -> float:
    value = r.get("label")
    if not isinstance(value, bool):
        raise r.error("label", f"expected true or false (TRL's unpaired preference label), got "
                      f"{type(value).__name__} {value!r}")
    return 1.0 if value else 0.0


def _rating(value: Any) -> float | None:
    """A UltraFeedback rating ("4", 4.0) as a float; None for "N/A"/missing; raises ValueError otherwise."""
    if value is None or (isinstance(value, str) and value.strip().upper() in ("N/A", "NA", "")):
        return None
    try:
        x = float(value)
    except OverflowError:
        raise ValueError(f"a rating of {_number_text(value)}") from None
    if not math.isfinite(x):
        raise ValueError(f"non-finite rating {value!r}")
    return check_reward(x)


def _ultrafeedback(r: _Row, reward_field: str) -> tuple[list[Message], list[str], list[float], int]:
    prompt = [{"role": "user", "content": r.text(r.get("instruction"), "instruction")}]
    completions = r.get("completions")
    if not isinstance(completions, list) or not completions:
        raise r.error("completions", "expected a non-empty list of {response, overall_score, annotations}")
    responses, rewards, unrated = [], [], 0
    for i, c in enumerate(completions):
        f = f"completions[{i}]"
        if not isinstance(c, Mapping):
            raise r.error(f, f"expected an object, got {type(c).__name__}")
        try:
            if reward_field == "overall":
                reward = _rating(c.get("overall_score"))
                field = f"{f}.overall_score"
            else:
                field = f"{f}.annotations"
                ann = c.get("annotations")
                if isinstance(ann, Mapping):
                    ratings = [_rating(a.get("Rating") if isinstance(a, Mapping) else None) for a in ann.values()]
                    ratings = [x for x in ratings if x is not None]
                    reward = sum(ratings) / len(ratings) if ratings else None
                else:  # some exports keep only the precomputed mean
                    field = f"{f}.fine-grained_score"
                    reward = _rating(c.get("fine-grained_score"))
        except (TypeError, ValueError) as e:
            raise r.error(field, f"non-numeric rating: {e}") from e
        if reward is None:
            unrated += 1
            continue
        responses.append(r.text(c.get("response"), f"{f}.response"))
        rewards.append(reward)
    return prompt, responses, rewards, unrated


def parse_row(data: Any, fmt: str, *, source: str, row: int, one_based_line: bool | str,
              reward_field: str = "overall", roles: Collection[str] = KNOWN_ROLES) -> Example:
    """Normalise one raw row of format ``fmt`` (an UltraFeedback row may keep no rated response).

    An ``unpaired`` row becomes a group of its one completion (reward 1.0 / 0.0);
    :func:`read_examples` merges the rows of one prompt.
    """
    where = row_label(row, one_based_line=one_based_line)
    r = _Row(data, source, where, roles)
    reference, unrated = None, 0
    kind: Kind = "group"
    if fmt == "group":
        prompt, responses, rewards, reference = _group(r)
    elif fmt == "pair":
        prompt, responses, rewards = _pair(r)
        kind = "pair"
    elif fmt == "unpaired":
        prompt, response = _prompt_and_completion(r)
        responses, rewards = [response], [_label(r)]
    elif fmt == "ultrafeedback":
        prompt, responses, rewards, unrated = _ultrafeedback(r, reward_field)
    elif fmt == "sft":
        prompt, response = r.split_conversation("messages")
        responses, rewards, kind = [response], None, "sft"
    elif fmt == "prompt_completion":
        prompt, response = _prompt_and_completion(r)
        responses, rewards, kind = [response], None, "sft"
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return Example(row=row, where=where, prompt=prompt, responses=responses, rewards=rewards,
                   reference_answer=reference, kind=kind, unrated=unrated)


# ---------------------------------------------------------------- reading files

_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
         (b"\xfe\xff", "UTF-16"))


def _decode_line(path: str, line_no: int, raw: bytes) -> str:
    """One line of a text data file as str, or a :class:`DataError` naming the file and line."""
    where = row_label(line_no, one_based_line=True)
    if line_no == 1:
        for bom, name in _BOMS:
            if raw.startswith(bom):
                raise DataError(path, None, None, f"the file is {name} text (it starts with a {name} byte-order "
                                f"mark); data files must be UTF-8: convert it with `iconv -f {name} -t UTF-8`")
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark (Windows editors write one)
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(path, where, None, f"NUL byte at byte {nul + 1} of the line: a binary or UTF-16 file? data "
                        "files must be UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, where, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of "
                        "the line): a binary file, or another encoding? data files must be UTF-8") from None


def iter_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 text file; other encodings and binary content name the line."""
    with Path(path).open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            yield line_no, _decode_line(str(path), line_no, raw)


def parse_json(text: str) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, what is wrong)`` for text that is not JSON (deep nesting included)."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} at column {e.colno}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply (more than Python's recursion limit)"
    except ValueError as e:  # e.g. an integer literal beyond Python's 4300-digit limit
        return None, f"invalid JSON: {e}"


def _read_json_array(path: Path) -> list[Any]:
    data = path.read_bytes()
    text = "\n".join(_decode_line(str(path), i, line) for i, line in enumerate(data.split(b"\n"), start=1))
    value, error = parse_json(text)
    if error is not None:
        raise DataError(str(path), None, None, error)
    return value


#: file types read here (naming file, line and field); a directory of them is read file by file
OWN_SUFFIXES = (".jsonl", ".json", ".parquet")


def _directory_files(p: Path, split: str) -> list[Path] | None:
    """The files of a local data directory that ``datasets.load_dataset`` would read for ``split`` (its
    split-name rules: ``train-*.jsonl``, ``test/`` ...), when they are JSONL / JSON / Parquet; None when
    they are of another kind (CSV, ...), which `datasets` reads."""
    from datasets.data_files import DataFilesDict, get_data_patterns  # heavy: datasets, only for directories

    try:
        by_split = DataFilesDict.from_patterns(get_data_patterns(str(p)), base_path=str(p))
    except Exception:  # noqa: BLE001 - datasets' EmptyDatasetError and friends: no data file at all
        raise DataError(str(p), None, None, "no data files in the directory (expected .jsonl, .json or "
                        ".parquet files)") from None
    if split not in by_split:
        raise DataError(str(p), None, None, f"no '{split}' split in the directory (its files make the splits "
                        f"{', '.join(str(s) for s in by_split)})")
    files = sorted(Path(f) for f in by_split[split])
    own = [f for f in files if f.suffix in OWN_SUFFIXES and not f.name.startswith((".", "_"))]
    return own or None


def _iter_directory_rows(p: Path, files: list[Path]) -> Iterator[tuple[int, str, Any]]:
    """Rows of every file in turn: a running index (the row id) and ``part-1.jsonl line 3`` (the label)."""
    index = 0
    for f in files:
        name = f.relative_to(p) if f.is_relative_to(p) else f
        for row, one_based, raw in iter_raw_rows(str(f)):
            yield index, f"{name} {row_label(row, one_based_line=one_based)}", raw
            index += 1


def _single_object(p: Path) -> bool:
    """Whether a .json file is one JSON object (not rows): it parses whole, as a mapping."""
    try:
        value, error = parse_json(p.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        return False
    return error is None and isinstance(value, Mapping)


def iter_raw_rows(path: str, *, split: str = "train") -> Iterator[tuple[int, bool | str, Any]]:
    """Yield ``(row, position, raw)`` from a JSONL / JSON / Parquet file, a directory of them, a saved dataset,
    or a hub name. ``position`` is what :func:`row_label` needs: True (``row`` is a 1-based line), False (a
    0-based index), or the label itself (``part-1.jsonl line 3``: a file of a directory; ``row`` is then the
    running index over the directory)."""
    p = Path(path)
    if p.suffix in (".jsonl", ".json", ".parquet") and not p.exists():
        # a mistyped local path must not fall through to a hub download attempt
        raise DataError(path, None, None, "no such file")
    if p.suffix in (".jsonl", ".json", ".parquet") and not p.is_file():
        raise DataError(path, None, None, "is a directory, not a data file")
    if p.suffix in (".jsonl", ".json"):
        if p.suffix == ".json":
            with p.open("rb") as f:
                head = f.read(1 << 12).lstrip(b"\xef\xbb\xbf \t\r\n")
            if head.startswith(b"["):
                value = _read_json_array(p)
                if not isinstance(value, list):
                    raise DataError(path, None, None, "expected a JSON array of rows")
                yield from ((i, False, raw) for i, raw in enumerate(value))
                return
        for line_no, line in iter_text_lines(p):
            if not line.strip():
                continue  # a blank line is not a row (trailing newlines are common)
            raw, error = parse_json(line.rstrip("\r\n"))
            if error is not None:
                if p.suffix == ".json" and _single_object(p):
                    raise DataError(path, None, None, "holds one JSON object, not rows: a .json data file must "
                                    "hold a list of rows (a JSON array), or use JSONL (one row per line)")
                raise DataError(path, row_label(line_no, one_based_line=True), None, error)
            yield line_no, True, raw
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq  # heavy: pyarrow, only for a Parquet file

        try:
            batches = pq.ParquetFile(p).iter_batches(batch_size=1024)
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError for a damaged file
            raise DataError(path, None, None, f"not a readable Parquet file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        index = 0
        for batch in batches:
            for raw in batch.to_pylist():
                yield index, False, raw
                index += 1
    else:
        import datasets  # heavy: datasets, only for what the JSONL / Parquet readers do not read

        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()
                           or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        elif p.is_dir() and (files := _directory_files(p, split)) is not None:
            yield from _iter_directory_rows(p, files)  # our reader: a bad row names its file and line
            return
        elif p.is_dir() or not p.suffix:
            ds = datasets.load_dataset(path, split=split)  # a local data dir, or a hub name on a cluster
        else:
            raise DataError(path, None, None, "unsupported file type; use .jsonl, .json, .parquet, a saved "
                            "`datasets` directory or a `datasets` name")
        yield from ((i, False, raw) for i, raw in enumerate(ds))


def _undetected(source: str, where: str, raw: Any, fmt: str) -> DataError:
    if fmt == "prompt_only":
        return DataError(source, where, None, "prompt-only rows (TRL's prompt-only format) have no responses to "
                         "train on: sample responses with rao_megatron.cli.generate, score them with "
                         "rao_megatron.cli.annotate, and train on that output")
    fields = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
    return DataError(source, where, None, f"cannot tell the row format from its fields {fields}; expected "
                     "responses (group), chosen+rejected (pair), completion+label (unpaired), "
                     "instruction+completions (ultrafeedback), messages or prompt+completion (sft), or pass format=")


def _merge_unpaired(examples: list[Example]) -> list[Example]:
    """The rows of one prompt as one group (first row's position, responses and rewards in file order)."""
    merged: dict[str, Example] = {}
    for ex in examples:
        key = json.dumps([[m["role"], m["content"].strip()] for m in ex.prompt])
        if key not in merged:
            merged[key] = Example(row=ex.row, where=ex.where, prompt=ex.prompt, responses=[], rewards=[],
                                  reference_answer=None, kind="group", rows=0)
        merged[key].rows += 1
        merged[key].responses += ex.responses
        merged[key].rewards += ex.rewards or []
    return list(merged.values())


def read_examples(path: str | Path, *, format: str | None = None, reward_field: str = "overall",
                  split: str = "train", roles: Collection[str] = KNOWN_ROLES) -> list[Example]:
    """Read and normalise every row of ``path``; a malformed row raises :class:`DataError`.

    The format is detected from the first row (then enforced on all rows, so a row missing a field
    reports that field). ``reward_field`` picks UltraFeedback's ``overall`` score or the mean of its
    ``fine_grained`` ratings. Responses without a rating are left out and counted in ``Example.unrated``.
    ``roles``: the message roles allowed (the chat template's). Unpaired rows are merged per prompt.
    """
    source = str(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} or None (detect), got {format!r}")
    if reward_field not in REWARD_FIELDS:
        raise ValueError(f"reward_field must be one of {REWARD_FIELDS}, got {reward_field!r}")
    examples: list[Example] = []
    fmt = format
    for row, one_based, raw in iter_raw_rows(source, split=split):
        if fmt is None:
            fmt = detect_format(raw) if isinstance(raw, Mapping) else ""
            if fmt in ("", "prompt_only"):
                raise _undetected(source, row_label(row, one_based_line=one_based), raw, fmt)
        examples.append(parse_row(raw, fmt, source=source, row=row, one_based_line=one_based,
                                  reward_field=reward_field, roles=roles))
    if not examples:
        raise DataError(source, None, None, "no rows to train on")
    return _merge_unpaired(examples) if fmt == "unpaired" else examples
