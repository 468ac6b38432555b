"""Annotate a data set with rewards, resumably: read rows one by one, score them in chunks, write groups.

Input: any format :mod:`rao_megatron.data.formats` reads (project groups, pairs / ultrafeedback_binarized,
raw UltraFeedback, UltraChat SFT). Output: the project group format, JSONL (or Parquet when ``out`` ends
in ``.parquet``): ``prompt`` (a string) or ``messages``, ``responses``, ``rewards``, and ``reference`` /
``reference_reward`` when the row has GRAO's reference answer; other fields of the row (``answer``,
``prompt_id``, ...) are kept, the fields of the input format that the group row replaces are not.

Nothing is dropped silently: a row that cannot be parsed or scored goes to ``out + ".rejected.jsonl"``
with its file, row, field and reason; the summary counts kept, truncated and rejected rows. When every
row is rejected (a reward function that returns a string, say), no output is written and
:func:`annotate` raises :class:`NothingKept` with the first reason.

Resuming: scored rows are appended to ``out + ".partial.jsonl"`` (rejected ones to the side file's
``.partial``) and, after each chunk, ``out + ".progress.json"`` records how many input rows are done and
how long both files were then. A rerun of the same command truncates the files to those lengths (a
crash may have left half a chunk), skips the rows done and goes on; at the end both are renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist
from tqdm import tqdm

from rao_megatron.config import guarded_write
from rao_megatron.data.formats import FORMATS, detect_format

from .rows import ParsedRow, Rejection, count_input_rows, iter_input, output_row, parse_input_row

PROGRESS_VERSION = 1


class NothingKept(ValueError):
    """Every input row was rejected: no output was written (the reasons are in the rejected side file)."""


@dataclass
class RowScores:
    """A scorer's answer for one row: a reward per response (reference last), or a rejection."""

    rewards: list[float] | None = None
    truncated: int = 0               # responses cut to fit max_length before scoring
    rejection: Rejection | None = None


class Scorer(Protocol):
    """Scores chunks of parsed rows. Collective scorers are called on every rank with the same chunk."""

    fingerprint: str                 # what a partial output must have been made with to be resumed
    writes: bool                     # whether this rank writes the output (global rank 0)

    def score(self, rows: list[ParsedRow]) -> list[RowScores]:
        """One :class:`RowScores` per row (rows with a ``rejection`` already set are passed through)."""
        ...


@dataclass
class AnnotateSummary:
    """Counts over the whole input (a resumed run includes the rows done before)."""

    rows_read: int = 0
    rows_kept: int = 0
    rows_rejected: int = 0
    rows_truncated: int = 0
    responses_scored: int = 0
    responses_truncated: int = 0
    finished: bool = False
    resumed_at: int = 0
    out: str = ""
    rejected_path: str = ""
    first_rejection: str = ""        # "line 3, field 'chosen': why" of the first rejected row

    def text(self) -> str:
        """Human-readable summary (printed at the end of a run)."""
        state = "done" if self.finished else "stopped early; rerun the same command to continue"
        return (f"{self.rows_read} rows read: {self.rows_kept} kept ({self.responses_scored} responses scored), "
                f"{self.rows_truncated} kept with truncated responses ({self.responses_truncated} responses cut "
                f"to max_length), {self.rows_rejected} rejected"
                + (f" -> {self.rejected_path}" if self.rows_rejected else "")
                + (f"; resumed after {self.resumed_at} rows" if self.resumed_at else "") + f" [{state}]")


def state_paths(out: str | os.PathLike) -> dict[str, Path]:
    """The final, partial, rejected and progress files of an annotation run writing ``out``."""
    out = Path(out)
    return {"out": out, "partial": Path(f"{out}.partial.jsonl"), "rejected": Path(f"{out}.rejected.jsonl"),
            "rejected_partial": Path(f"{out}.rejected.jsonl.partial"), "progress": Path(f"{out}.progress.json")}


@dataclass
class _Progress:
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, paths: dict[str, Path], identity: dict[str, Any], restart: bool) -> _Progress:
        """Load the progress of an interrupted run with the same identity, or start afresh."""
        p = paths["progress"]
        if p.is_file() and not restart:
            data = json.loads(p.read_text())
            if data.get("identity") != identity:
                raise ValueError(f"{p} belongs to an annotation of other input or with another scorer "
                                 f"({data.get('identity')}); pass --restart to discard it")
            for name in ("partial", "rejected_partial"):  # drop what a crash wrote after the last record
                with open(paths[name], "ab") as f:
                    f.truncate(data[f"{name}_bytes"])
            return cls(data)
        for name in ("partial", "rejected_partial", "progress"):
            paths[name].unlink(missing_ok=True)
        paths["out"].parent.mkdir(parents=True, exist_ok=True)
        for name in ("partial", "rejected_partial"):
            paths[name].touch()
        summary = dataclasses.asdict(AnnotateSummary())
        return cls({"version": PROGRESS_VERSION, "identity": identity, "format": None, "rows_done": 0,
                    "partial_bytes": 0, "rejected_partial_bytes": 0, "summary": summary})

    def save(self, paths: dict[str, Path]) -> None:
        """Record the files' lengths and counts atomically (temp file + rename)."""
        self.data["partial_bytes"] = paths["partial"].stat().st_size
        self.data["rejected_partial_bytes"] = paths["rejected_partial"].stat().st_size
        tmp = paths["progress"].with_name(paths["progress"].name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, paths["progress"])


def _broadcast(obj: Any) -> Any:
    """``obj`` of global rank 0 on every rank (all ranks read the input, only rank 0 the progress)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _input_identity(data: str, scorer: Scorer, fmt: str | None, split: str) -> dict[str, Any]:
    """What a partial output must match to be resumed: the input file (path, size, mtime) and the scorer."""
    p = Path(data)
    stat = p.stat() if p.exists() and p.is_file() else None
    return {"data": str(p.resolve()) if p.exists() else data, "size": stat.st_size if stat else None,
            "mtime_ns": stat.st_mtime_ns if stat else None, "scorer": scorer.fingerprint, "format": fmt,
            "split": split}


def _start(paths: dict[str, Path], identity: dict[str, Any], restart: bool, writes: bool) -> tuple[Any, int, Any]:
    """Rank 0 loads or starts the progress; every rank learns the resume point (or the error) from it."""
    prog, state = None, None
    if writes:
        try:
            prog = _Progress.start(paths, identity, restart)
            state = ("ok", prog.data["rows_done"], prog.data["format"])
        except (ValueError, OSError) as e:
            state = ("error", str(e), None)
    state = _broadcast(state)
    if state[0] == "error":
        raise ValueError(state[1])
    return prog, state[1], state[2]


def _finish(paths: dict[str, Path], summary: AnnotateSummary) -> None:
    """Move the partial output into place (converting to Parquet if asked) and drop the progress record."""
    out = paths["out"]
    if not summary.rows_kept and summary.rows_read:
        # an empty output would pass for a scored data set downstream: write none (the reasons stay)
        paths["partial"].unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    elif out.suffix == ".parquet":
        import pyarrow as pa  # heavy: pyarrow, only for a Parquet output
        import pyarrow.parquet as pq

        with paths["partial"].open(encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        columns = list(dict.fromkeys(k for r in records for k in r))  # from_pylist reads only the first row's keys
        table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in records])
        tmp = out.with_name(out.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, out)
        paths["partial"].unlink()
    else:
        os.replace(paths["partial"], out)
    if summary.rows_rejected:
        os.replace(paths["rejected_partial"], paths["rejected"])
    else:
        paths["rejected_partial"].unlink(missing_ok=True)
        paths["rejected"].unlink(missing_ok=True)  # a stale side file of an earlier run would mislead
    paths["progress"].unlink()


def _write_chunk(paths: dict[str, Path], rows: list[ParsedRow], results: list[RowScores], fmt: str,
                 source: str, summary: AnnotateSummary) -> None:
    """Append a scored chunk to the partial files and count it (fsync: the progress record follows)."""
    with paths["partial"].open("a", encoding="utf-8") as good, \
            paths["rejected_partial"].open("a", encoding="utf-8") as bad:
        for row, res in zip(rows, results):
            summary.rows_read += 1
            if res.rejection is not None:
                summary.rows_rejected += 1
                if not summary.first_rejection:
                    field = f", field '{res.rejection.field}'" if res.rejection.field else ""
                    summary.first_rejection = f"{row.where}{field}: {res.rejection.reason}"
                bad.write(json.dumps({"source": source, "row": row.where, "field": res.rejection.field,
                                      "reason": res.rejection.reason, "data": row.raw}, ensure_ascii=False) + "\n")
                continue
            assert res.rewards is not None
            summary.rows_kept += 1
            summary.responses_scored += len(res.rewards)
            summary.rows_truncated += res.truncated > 0
            summary.responses_truncated += res.truncated
            good.write(json.dumps(output_row(row, fmt, res.rewards), ensure_ascii=False) + "\n")
        for f in (good, bad):
            f.flush()
            os.fsync(f.fileno())


def _undetected(parsed: ParsedRow, error: str | None) -> ParsedRow:
    fields = sorted(parsed.raw) if isinstance(parsed.raw, Mapping) else type(parsed.raw).__name__
    parsed.rejection = Rejection(None, error or f"cannot tell the row format from its fields {fields}; pass --format")
    return parsed


def annotate(data: str, out: str | os.PathLike, scorer: Scorer, *, format: str | None = None,
             chunk_rows: int = 256, stop_after: int | None = None, restart: bool = False, progress: bool = True,
             split: str = "train", log: Callable[[str], None] = print) -> AnnotateSummary:
    """Score every response of ``data`` with ``scorer`` and write the group data set ``out`` (see module doc).

    Every rank calls it (a model scorer is collective); rank 0 writes. ``chunk_rows`` rows are scored
    between progress records; ``stop_after`` stops after that many rows of this call, leaving a
    resumable partial output (time-boxed jobs, tests). The format is ``format`` or detected from the
    first row that shows one.
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if chunk_rows < 1 or (stop_after is not None and stop_after < 0):
        raise ValueError("chunk_rows must be >= 1 and stop_after >= 0")
    paths = state_paths(out)
    prog, rows_done, fmt = _start(paths, _input_identity(data, scorer, format, split), restart, scorer.writes)
    fmt = fmt or format
    summary = AnnotateSummary(**prog.data["summary"]) if prog is not None else AnnotateSummary()
    summary.out, summary.rejected_path = str(paths["out"]), str(paths["rejected"])
    if rows_done and scorer.writes:
        summary.resumed_at = rows_done
        log(f"resuming {paths['partial']}: {rows_done} input rows already done")
    bar = tqdm(total=count_input_rows(data) if scorer.writes and progress else None, initial=rows_done,
               disable=not (scorer.writes and progress), desc="annotating", unit="row", dynamic_ncols=True)
    rows = iter_input(data, start=rows_done, split=split)
    done_now, exhausted = 0, False
    try:
        while not exhausted:
            limit = chunk_rows if stop_after is None else min(chunk_rows, stop_after - done_now)
            if limit <= 0:
                break
            chunk: list[ParsedRow] = []
            exhausted = True
            for index, row, one_based, raw, error in rows:
                if fmt is None and error is None and isinstance(raw, Mapping):
                    found = detect_format(raw)
                    fmt = found if found in FORMATS else None  # prompt-only rows: nothing to score
                if fmt is None:
                    chunk.append(_undetected(parse_input_row(index, row, one_based, raw, None, "group", data), error))
                else:
                    chunk.append(parse_input_row(index, row, one_based, raw, error, fmt, str(data)))
                if len(chunk) >= limit:
                    exhausted = False
                    break
            if not chunk:
                break
            results = scorer.score(chunk)
            if prog is not None:
                with guarded_write(paths["partial"], "annotation output"):  # kept: a rerun resumes it
                    _write_chunk(paths, chunk, results, fmt or "group", str(data), summary)
                    prog.data.update(rows_done=chunk[-1].index + 1, format=fmt, summary=dataclasses.asdict(summary))
                    prog.save(paths)
            done_now += len(chunk)
            bar.update(len(chunk))
    finally:
        bar.close()
    summary.finished = exhausted
    if prog is not None and exhausted:
        with guarded_write(paths["out"], "annotation output", partial=Path(f"{paths['out']}.tmp")):
            _finish(paths, summary)
    if exhausted:  # every rank learns whether anything was kept (rank 0 counted)
        read, kept, first = _broadcast((summary.rows_read, summary.rows_kept, summary.first_rejection))
        if read and not kept:
            raise NothingKept(f"all {read} rows of {data} were rejected, so nothing was written to {paths['out']}; "
                              f"the first: {first} (every reason: {paths['rejected']})")
    return summary
