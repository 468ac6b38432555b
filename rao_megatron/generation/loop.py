"""The generation loop: prompts -> output rows in batches, the in-memory API, and resuming an output file.

Output: one row per prompt, ``{id, prompt | messages (as input), responses: [K strings], sampling: {n,
temperature, top_p, max_new_tokens, seed, backend, model}, ...other fields}``: the project's group format
without rewards, ready for annotation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rao_megatron.data.errors import DataError, row_label
from rao_megatron.data.prompts import Prompt, check_unique_prompts, id_key, parse_prompt_row

from .backends import HFBackend, VLLMBackend, make_backend
from .sampling import SamplingConfig


def iter_generated(engine: HFBackend | VLLMBackend, prompts: Sequence[Prompt], cfg: SamplingConfig, *,
                   model_name: str, batch_size: int = 16, progress: bool = True,
                   done: int = 0) -> Iterator[list[dict[str, Any]]]:
    """Output rows, one list per batch of ``batch_size`` prompts (``done``: prompts skipped, for the bar)."""
    cfg.check()
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    sampling = cfg.record(engine.name, model_name)
    bar = tqdm(total=done + len(prompts), initial=done, disable=not progress, desc="generating", unit="prompt",
               dynamic_ncols=True)
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            responses = engine.generate(batch, cfg)
            rows = []
            for p, ys in zip(batch, responses):
                row = {"id": p.row["id"]}
                row.update((k, p.row[k]) for k in ("prompt", "messages") if k in p.row)
                row["responses"], row["sampling"] = ys, dict(sampling)
                row.update((k, v) for k, v in p.row.items() if k not in row)
                rows.append(row)
            yield rows
            bar.update(len(batch))
    finally:
        bar.close()


def generate_rows(model_dir: str | os.PathLike | None, rows: Sequence[Mapping[str, Any]], *, n: int = 4,
                  max_new_tokens: int = 64, temperature: float = 0.7, top_p: float = 0.95, seed: int = 0,
                  backend: str = "hf", batch_size: int = 16, progress: bool = True, model: Any = None,
                  tokenizer: Any = None, dtype: str = "auto", threads: int | None = None) -> list[dict[str, Any]]:
    """Generate ``n`` responses for each input row (rows: :mod:`rao_megatron.data.prompts`; output: this module's doc).

    Pass ``model`` (an HF causal LM) and ``tokenizer`` to reuse an already loaded model (GRAO online rounds);
    ``model_dir`` is then only recorded in ``sampling.model``.
    """
    prompts = [parse_prompt_row(r, index=i, source="<rows>", where=row_label(i, one_based_line=False))
               for i, r in enumerate(rows)]
    check_unique_prompts(prompts, "<rows>")
    cfg = SamplingConfig(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    cfg.check()
    engine = make_backend(backend, model_dir, seed=seed, dtype=dtype, model=model, tokenizer=tokenizer,
                          threads=threads)
    name = str(model_dir) if model_dir is not None else str(getattr(model, "name_or_path", "") or "<model>")
    return [row for batch in iter_generated(engine, prompts, cfg, model_name=name, batch_size=batch_size,
                                            progress=progress) for row in batch]


def _same_sampling(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    def norm(s: Mapping[str, Any]) -> dict[str, Any]:
        return {**s, "model": os.path.realpath(str(s.get("model")))}

    return norm(a) == norm(b)


def load_done(out: Path, sampling: Mapping[str, Any], log: Callable[[str], None] = print) -> set[str]:
    """Ids already in ``out`` (a half-written last line is cut off); other sampling settings are an error."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log(f"{out}: dropping a half-written last line ({len(data) - end} bytes) before resuming")
        with out.open("r+b") as f:
            f.truncate(end)
    done: set[str] = set()
    for line_no, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(str(out), row_label(line_no, one_based_line=True), None,
                            f"invalid JSON in the output being resumed: {e.msg}") from e
        if not isinstance(row, dict) or "id" not in row:
            raise DataError(str(out), row_label(line_no, one_based_line=True), "id",
                            "missing in the output being resumed (is --out another kind of file?)")
        if not _same_sampling(row.get("sampling") or {}, sampling):
            raise ValueError(f"{out} holds samples made with other settings ({row.get('sampling')}, now {dict(sampling)})"
                             "; pass another --out, or --restart to overwrite it")
        done.add(id_key(row["id"]))
    return done
