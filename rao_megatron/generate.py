"""Sample K responses per prompt with vLLM (GPU) or HF transformers (CPU / GPU); one JSONL output format.

    python -m rao_megatron.generate --model .cache/smollm2-hf --prompts prompts.jsonl --out samples.jsonl --n 4
    python -m rao_megatron.annotate --data samples.jsonl --out scored.jsonl \\
        --reward-fn rao_megatron.rewards.rule:exact_final_number

Input (JSONL, Parquet or a saved `datasets` directory): rows with ``prompt`` (a string: one user turn
through the tokenizer's chat template; or a list of messages) or ``messages`` (a chat list; a final
assistant turn is dropped from the prompt and kept as ``reference``), an optional ``id`` (default: the
row index) and any other fields (``answer``, ...), which are passed through. Input ``responses`` /
``rewards`` are replaced.

Output: one JSON line per prompt, ``{id, prompt | messages (as input), responses: [K strings],
sampling: {n, temperature, top_p, max_new_tokens, seed, backend, model}, ...other fields}``: the
project's group format without rewards, ready for ``rao_megatron.annotate``.

Interrupted? Rerun the same command: prompts whose id is already in --out are skipped (rows are
appended and flushed per batch). Sampling is seeded per prompt id (HF: per sample too), so a resumed
run writes what an uninterrupted one would have. ``--temperature 0`` is greedy: K copies of one answer.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rao_megatron.cli import run_cli
from rao_megatron.data.errors import DataError, row_label

BACKENDS = ("auto", "hf", "vllm")
DTYPES = ("auto", "float32", "bfloat16")
#: input fields the output replaces (the rest of the row is passed through)
REPLACED_FIELDS = ("responses", "rewards", "sampling")
Message = dict[str, str]


@dataclass
class SamplingConfig:
    """How responses are sampled; recorded in every output row (``sampling``) and checked on resume."""

    n: int = 4                       # responses per prompt
    max_new_tokens: int = 64         # response length limit in tokens
    temperature: float = 0.7         # 0: greedy (one answer, copied n times)
    top_p: float = 0.95              # nucleus sampling mass (1: off)
    seed: int = 0                    # with the prompt id, seeds each prompt's samples

    def check(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"--n and --max-new-tokens must be >= 1, got {self.n} and {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"--temperature must be >= 0 and --top-p in (0, 1], got {self.temperature}, {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def record(self, backend: str, model: str) -> dict[str, Any]:
        """The ``sampling`` field of an output row."""
        return {"n": self.n, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed, "backend": backend, "model": model}


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


def prompt_seed(seed: int, prompt_id: Any, sample: int | None = None) -> int:
    """A 63-bit seed for one prompt (vLLM request) or one sample of it (HF), independent of batching."""
    text = f"{seed}\x00{id_key(prompt_id)}" + ("" if sample is None else f"\x00{sample}")
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------- input rows


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
    from rao_megatron.data.formats import iter_raw_rows

    source = str(path)
    prompts: list[Prompt] = []
    for index, (row, one_based, raw) in enumerate(iter_raw_rows(source, split=split)):
        if limit is not None and index >= limit:
            break
        prompts.append(parse_prompt_row(raw, index=index, source=source, where=row_label(row, one_based_line=one_based)))
    if not prompts:
        raise DataError(source, None, None, "no prompts")
    _check_unique(prompts, source)
    return prompts


def _check_unique(prompts: Sequence[Prompt], source: str) -> None:
    seen: dict[str, int] = {}
    for i, p in enumerate(prompts):
        if p.key in seen:
            raise DataError(source, f"row {i} (0-based)", "id",
                            f"duplicate id {p.id!r} (also row {seen[p.key]}): ids must be unique (resume and "
                            "evaluation join on them)")
        seen[p.key] = i


# ---------------------------------------------------------------- backends


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and the chat template's end-of-turn token (``<|im_end|>`` for SmolLM2)."""
    from rao_megatron.data.dataset import end_of_turn_ids

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eot = end_of_turn_ids(tokenizer)
    return list(dict.fromkeys(ids + eot[:1]))


def prompt_token_ids(tokenizer: Any, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Chat-template token ids with the generation prompt, tokenized as for training (no extra specials)."""
    texts = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False) for p in prompts]
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def resolve_backend(backend: str, *, have_model: bool = False) -> str:
    """``auto``: vLLM when CUDA and vllm are available (and no HF model object was passed), else HF."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        if backend == "vllm" and have_model:
            raise ValueError("a loaded HF model can only be used with backend='hf'")
        return backend
    import torch

    if not have_model and torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "hf"


class _SeededSampler:
    """Logits processor: draws each row's next token with that row's own generator (exponential race).

    argmax(p / E) with E ~ Exp(1) i.i.d. is a draw from p. The chosen token becomes the only finite score,
    so greedy search takes it. Every row draws once per step whatever the batch, so a sample depends on its
    seed only, not on which prompts share its batch.
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        import torch

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs = torch.softmax(scores.float(), dim=-1)
        noise = torch.stack([torch.empty(scores.shape[-1]).exponential_(generator=g) for g in self.generators])
        picked = (probs / noise.to(probs.device)).argmax(dim=-1, keepdim=True)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picked, 0.0)


class HFBackend:
    """transformers ``generate``: left padding, one batch of prompts × K samples per call, stops at EOS / end-of-turn."""

    name = "hf"

    def __init__(self, model_dir: str | os.PathLike | None, *, model: Any = None, tokenizer: Any = None,
                 dtype: str = "auto", threads: int | None = None) -> None:
        import torch

        from rao_megatron.data.tokenizer import load_tokenizer

        if threads:
            torch.set_num_threads(threads)
        if model is None and model_dir is None:
            raise ValueError("pass model_dir or a loaded model")
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir or model.name_or_path)
        if model is None:
            from transformers import AutoModelForCausalLM

            device = "cuda" if torch.cuda.is_available() else "cpu"
            if dtype == "auto":
                dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device)
        self.model = model
        self.stop = stop_token_ids(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else self.stop[0]

    def generate(self, prompts: Sequence[Prompt], cfg: SamplingConfig) -> list[list[str]]:
        """``cfg.n`` responses for each prompt."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList
        from transformers.generation import TemperatureLogitsWarper, TopPLogitsWarper

        copies = 1 if cfg.greedy else cfg.n
        ids = [x for x in prompt_token_ids(self.tokenizer, prompts) for _ in range(copies)]
        longest = max(map(len, ids))
        device = self.model.device
        input_ids = torch.tensor([[self.pad] * (longest - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (longest - len(x)) + [1] * len(x) for x in ids], device=device)
        processors = LogitsProcessorList()
        if not cfg.greedy:
            processors.append(TemperatureLogitsWarper(cfg.temperature))
            if cfg.top_p < 1:
                processors.append(TopPLogitsWarper(cfg.top_p))
            processors.append(_SeededSampler([prompt_seed(cfg.seed, p.id, j) for p in prompts for j in range(copies)]))
        gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1,
                                   eos_token_id=self.stop, pad_token_id=self.pad)
        was_training = self.model.training  # a caller's model (GRAO online rounds) goes back as it came
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen_cfg,
                                          logits_processor=processors)
        finally:
            self.model.train(was_training)
        texts = []
        for seq in out[:, longest:].tolist():
            cut = next((i for i, t in enumerate(seq) if t in self.stop), len(seq))
            texts.append(self.tokenizer.decode(seq[:cut], skip_special_tokens=True))
        return [texts[i * copies:(i + 1) * copies] * (cfg.n // copies) for i in range(len(prompts))]


class VLLMBackend:
    """vLLM offline engine; the chat template is applied with the HF tokenizer and token ids are passed in."""

    name = "vllm"

    def __init__(self, model_dir: str | os.PathLike, *, seed: int = 0, dtype: str = "auto",
                 tokenizer: Any = None, **engine_kwargs: Any) -> None:
        from vllm import LLM

        from rao_megatron.data.tokenizer import load_tokenizer

        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
        self.llm = LLM(model=str(model_dir), seed=seed, dtype=dtype, **engine_kwargs)
        self.stop = stop_token_ids(self.tokenizer)

    def generate(self, prompts: Sequence[Prompt], cfg: SamplingConfig) -> list[list[str]]:
        """``cfg.n`` responses for each prompt (one seeded request per prompt)."""
        from vllm import SamplingParams

        copies = 1 if cfg.greedy else cfg.n
        params = [SamplingParams(n=copies, temperature=cfg.temperature, top_p=1.0 if cfg.greedy else cfg.top_p,
                                 max_tokens=cfg.max_new_tokens, seed=prompt_seed(cfg.seed, p.id),
                                 stop_token_ids=self.stop, skip_special_tokens=True) for p in prompts]
        requests = [{"prompt_token_ids": ids} for ids in prompt_token_ids(self.tokenizer, prompts)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [[c.text for c in o.outputs] * (cfg.n // copies) for o in outputs]


def make_backend(backend: str, model_dir: str | os.PathLike | None, *, seed: int = 0, dtype: str = "auto",
                 model: Any = None, tokenizer: Any = None, threads: int | None = None) -> HFBackend | VLLMBackend:
    """Load the model for ``backend`` (``auto`` resolved here)."""
    backend = resolve_backend(backend, have_model=model is not None)
    if backend == "vllm":
        if model_dir is None:
            raise ValueError("the vLLM backend needs model_dir")
        return VLLMBackend(model_dir, seed=seed, dtype=dtype, tokenizer=tokenizer)
    return HFBackend(model_dir, model=model, tokenizer=tokenizer, dtype=dtype, threads=threads)


# ---------------------------------------------------------------- the loop


def iter_generated(engine: HFBackend | VLLMBackend, prompts: Sequence[Prompt], cfg: SamplingConfig, *,
                   model_name: str, batch_size: int = 16, progress: bool = True,
                   done: int = 0) -> Iterator[list[dict[str, Any]]]:
    """Output rows, one list per batch of ``batch_size`` prompts (``done``: prompts skipped, for the bar)."""
    from tqdm import tqdm

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
    """Generate ``n`` responses for each input row (see the module doc for row and output formats).

    Pass ``model`` (an HF causal LM) and ``tokenizer`` to reuse an already loaded model (GRAO online rounds);
    ``model_dir`` is then only recorded in ``sampling.model``.
    """
    prompts = [parse_prompt_row(r, index=i, source="<rows>", where=row_label(i, one_based_line=False))
               for i, r in enumerate(rows)]
    _check_unique(prompts, "<rows>")
    cfg = SamplingConfig(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    cfg.check()
    engine = make_backend(backend, model_dir, seed=seed, dtype=dtype, model=model, tokenizer=tokenizer,
                          threads=threads)
    name = str(model_dir) if model_dir is not None else str(getattr(model, "name_or_path", "") or "<model>")
    return [row for batch in iter_generated(engine, prompts, cfg, model_name=name, batch_size=batch_size,
                                            progress=progress) for row in batch]


# ---------------------------------------------------------------- resuming


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


# ---------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rao_megatron.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint directory (weights, config, tokenizer with a chat template)")
    p.add_argument("--prompts", required=True, help="input rows: JSONL / Parquet file or saved `datasets` directory")
    p.add_argument("--out", required=True, help="output JSONL (appended to: a rerun resumes)")
    p.add_argument("--n", type=int, default=4, help="responses per prompt (K)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length limit in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0, help="seed; each prompt's samples are seeded from it and the prompt id")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="vllm (GPU), hf (transformers, CPU or GPU); auto: vllm if CUDA and vllm are available")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation call (and per flush of --out)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="model dtype (auto: float32 on CPU, bfloat16 on GPU for HF; the checkpoint's for vLLM)")
    p.add_argument("--limit", type=int, help="only the first N input rows")
    p.add_argument("--split", default="train", help="split of a saved `datasets` input")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (HF backend)")
    p.add_argument("--restart", action="store_true", help="overwrite --out instead of resuming it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise ValueError(f"--out must be a .jsonl file, got {out}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    cfg = SamplingConfig(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed)
    cfg.check()
    prompts = read_prompts(args.prompts, limit=args.limit, split=args.split)  # bad rows fail before the model loads
    backend = resolve_backend(args.backend)
    if args.restart:
        out.unlink(missing_ok=True)
    done = load_done(out, cfg.record(backend, args.model))
    todo = [p for p in prompts if p.key not in done]
    if done:
        print(f"resuming {out}: {len(prompts) - len(todo)} of {len(prompts)} prompts already there", flush=True)
    if todo:
        engine = make_backend(backend, args.model, seed=args.seed, dtype=args.dtype, threads=args.threads)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as f:
            for rows in iter_generated(engine, todo, cfg, model_name=args.model, batch_size=args.batch_size,
                                       progress=not args.no_progress, done=len(prompts) - len(todo)):
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                f.flush()
                os.fsync(f.fileno())
    print(f"{args.prompts} -> {out}: {len(prompts)} prompts × {cfg.n} responses ({len(todo)} generated now, "
          f"backend {backend})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, parser()))
