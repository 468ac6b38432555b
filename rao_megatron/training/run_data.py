"""What a run reads: its tokenizer, its tokenized training / held-out groups, and where its reference cache is.

Also what binds a reference cache to the run (:func:`reference_fingerprints`): the reference model's
content, the tokenizer, the length policy, dtype / log-prob precision, and the tokenized sequences of
each data file (rewards play no part).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rao_megatron.config import Config, ConfigError
from rao_megatron.training.model_init import model_dir


def run_tokenizer_path(cfg: Config) -> str | None:
    """``model.tokenizer``, else the HF model directory, else the initial checkpoint's; None: the tiny tokenizer."""
    path = cfg.model.tokenizer or model_dir(cfg)
    if path is None and cfg.model.init_checkpoint:
        from rao_megatron.models.checkpoint import checkpoint_tokenizer

        path = checkpoint_tokenizer(cfg.model.init_checkpoint)
    return str(Path(path).resolve()) if path is not None else None


def load_run_tokenizer(cfg: Config) -> Any:
    """The run's tokenizer (see :func:`run_tokenizer_path`)."""
    from rao_megatron.data.tokenizer import load_tokenizer

    return load_tokenizer(run_tokenizer_path(cfg))


@dataclass
class RunGroups:
    """Tokenized groups of a run: training, held-out, and which file each came from (for the cache)."""

    train: list[Any]
    heldout: list[Any]
    report: Any
    heldout_report: Any | None
    t0: int | None
    where: dict[str, dict[int, str]] = field(default_factory=dict)  # file -> group row -> "line 7"
    warnings: list[str] = field(default_factory=list)               # duplicates, held-out = training data

    def files(self, cfg: Config) -> list[tuple[str, list[Any]]]:
        """``(data file, its groups)``: what each reference cache covers (the training file's cache also
        holds its held-out split)."""
        if cfg.data.eval_path:
            return [(cfg.data.train_path, self.train), (cfg.data.eval_path, self.heldout)]
        return [(cfg.data.train_path, self.train + self.heldout)]


def _tokenize(path: str, cfg: Config, tokenizer: Any, spec: Any, t0: int | None) -> tuple[list[Any], Any, dict]:
    """Read, validate and tokenize one data file in this process: ``(groups, report, row labels)``."""
    from rao_megatron.data import read_examples, tokenize_examples
    from rao_megatron.data.tokenizer import template_roles

    examples = read_examples(path, reward_field=cfg.data.ultrafeedback_rating, roles=template_roles(tokenizer))
    labels = {ex.row: ex.where for ex in examples}
    groups, report = tokenize_examples(
        examples, tokenizer, max_length=cfg.data.max_length, overlength=cfg.data.overlength,
        max_responses=cfg.data.max_responses, min_responses=2 if spec.pairwise else 1,
        drop_tied=spec.pairwise, t0=t0, source=path)
    return groups, report, labels


def token_store_path(cfg: Config, path: str, tokenizer: Any, spec: Any, t0: int | None) -> Path:
    """Where the tokenize-once store of ``path`` lives: under ``data.token_cache`` (default: beside the data
    file, ``<data>.tokens/``), named by everything the tokens depend on."""
    from rao_megatron.data.token_store import store_key
    from rao_megatron.training.reference_cache import file_fingerprint, tokenizer_fingerprint

    parts = {"data": file_fingerprint(path), "tokenizer": tokenizer_fingerprint(tokenizer),
             "max_length": cfg.data.max_length, "overlength": cfg.data.overlength,
             "max_responses": cfg.data.max_responses, "pairwise": spec.pairwise,
             "rating": cfg.data.ultrafeedback_rating, "t0": t0}
    root = Path(cfg.data.token_cache) if cfg.data.token_cache else Path(f"{path}.tokens")
    return root / store_key(parts)


def _tokenized(path: str, cfg: Config, tokenizer: Any, spec: Any, t0: int | None,
               where: dict[str, dict[int, str]]) -> tuple[list[Any], Any]:
    """The tokenized groups of ``path``, tokenized once: global rank 0 builds the store (the others wait and
    get its verdict -- a data error is raised on every rank alike), then every rank memory-maps it. Where
    the store cannot be written (read-only data directory, no ``data.token_cache``) each rank tokenizes
    for itself, as before."""
    import torch.distributed as dist

    from rao_megatron.data.token_store import read_store, write_store
    from rao_megatron.parallel.startup import is_rank0, log0

    if not cfg.data.token_store:
        groups, report, where[path] = _tokenize(path, cfg, tokenizer, spec, t0)
        return groups, report
    store = token_store_path(cfg, path, tokenizer, spec, t0)
    verdict: list[Any] = [None]
    if is_rank0() and not store.is_dir():
        try:
            groups, report, labels = _tokenize(path, cfg, tokenizer, spec, t0)
            try:
                write_store(store, groups, report, labels)
                log0(f"tokenized {path} once: {store}")
            except OSError as e:
                verdict[0] = f"note: cannot write the token store {store} ({e.strerror or e}); every rank " \
                             "tokenizes for itself (set data.token_cache to a writable directory)"
        except Exception as e:  # noqa: BLE001 - handed to the other ranks, then raised here as it was
            verdict[0] = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    if isinstance(verdict[0], BaseException):
        raise verdict[0]
    if isinstance(verdict[0], str):
        log0(verdict[0])
    try:
        groups, report, where[path] = read_store(store)
    except ValueError:  # not written (see the note), or not visible from this node
        groups, report, where[path] = _tokenize(path, cfg, tokenizer, spec, t0)
    return groups, report


def _content(group: Any) -> tuple[int, ...]:
    from rao_megatron.data import sequence_key

    return tuple(sequence_key(group.prompt_ids, y) for y in group.responses)


def data_warnings(cfg: Config, train: list[Any], heldout: list[Any],
                  where: dict[str, dict[int, str]]) -> list[str]:
    """Rows that repeat an earlier row of the training file, and held-out groups that are training groups
    (``data.eval_path`` = ``data.train_path``, or duplicates across the split): counted, never silent."""
    path = cfg.data.train_path
    label = where.get(path, {})
    out, first = [], {}
    repeats: list[tuple[Any, Any]] = []
    for g in sorted(train + ([] if cfg.data.eval_path else heldout), key=lambda g: g.row):
        key = _content(g)
        if key in first:
            repeats.append((g, first[key]))
        else:
            first[key] = g
    if repeats:
        g, orig = repeats[0]
        out.append(f"warning: {path}: {len(repeats)} rows repeat an earlier row (same prompt and responses), e.g. "
                   f"{label.get(g.row, g.row)} repeats {label.get(orig.row, orig.row)}: they weigh more in training"
                   + ("" if cfg.data.eval_path else " and may land on both sides of the held-out split"))
    if cfg.data.eval_path and Path(cfg.data.eval_path).resolve() == Path(path).resolve():
        out.append(f"warning: data.eval_path is data.train_path ({path}): held-out figures are measured on "
                   "training data")
    elif heldout:
        seen = {_content(g) for g in train}
        shared = sum(_content(g) in seen for g in heldout)
        if shared:
            out.append(f"warning: {shared} of {len(heldout)} held-out groups also occur in the training data "
                       "(same prompt and responses): held-out figures are partly measured on training data")
    return out


def load_groups(cfg: Config, tokenizer: Any, spec: Any) -> RunGroups:
    """Read, validate and tokenize the training data (and held-out data); report what was dropped."""
    from rao_megatron.data import split_heldout

    if not cfg.data.train_path:
        raise ConfigError("config key 'data.train_path' is not set: give a JSONL/Parquet file or a dataset")
    where: dict[str, dict[int, str]] = {}
    groups, report = _tokenized(cfg.data.train_path, cfg, tokenizer, spec, None, where)
    if not groups:
        raise ConfigError(f"no usable groups in {cfg.data.train_path}: "
                          + "; ".join(line.strip() for line in report.summary().splitlines()))
    if spec.needs_rewards and groups[0].rewards is None:
        raise ConfigError(f"loss '{spec.name}' needs rewards, but {cfg.data.train_path} has none "
                          "(annotate it: python -m rao_megatron.cli.annotate)")
    t0 = report.t0
    if cfg.data.eval_path:
        heldout, heldout_report = _tokenized(cfg.data.eval_path, cfg, tokenizer, spec, t0, where)
        run = RunGroups(groups, heldout, report, heldout_report, t0, where)
    else:
        train, heldout = split_heldout(groups, cfg.data.eval_fraction, cfg.data.seed)
        run = RunGroups(train, heldout, report, None, t0, where)
    run.warnings = data_warnings(cfg, run.train, run.heldout, where)
    return run


def model_identity(cfg: Config, hf_config: Any) -> tuple[str, str]:
    """``(content id, source)`` of the reference model (the initial policy): the resolved checkpoint's
    content (:func:`~rao_megatron.training.reference_cache.checkpoint_content_id`), not its path; for a
    random init, the architecture and the seed. Reads up to 1 MiB per checkpoint file: call it once."""
    from rao_megatron.training.reference_cache import checkpoint_content_id, config_content_id

    if cfg.model.init_checkpoint:
        from rao_megatron.models.checkpoint import resolve_checkpoint

        path = resolve_checkpoint(cfg.model.init_checkpoint).resolve()
        return checkpoint_content_id(path), str(path)
    return (config_content_id(hf_config.to_dict(), cfg.train.seed),
            f"random init of {cfg.model.hf_config or cfg.model.preset}, seed {cfg.train.seed}")


def file_sequences(groups: list[Any], where: dict[int, str]) -> list[tuple[int, str]]:
    """``(sequence key, row label)`` of every tokenized sequence of one data file's groups."""
    from rao_megatron.data import sequence_key

    return [(sequence_key(g.prompt_ids, y), where.get(g.row, f"row {g.row}")) for g in groups for y in g.responses]


def reference_fingerprints(cfg: Config, tokenizer: Any, model: tuple[str, str],
                           groups: list[Any]) -> tuple[dict[str, str], dict[str, str]]:
    """``(strict fingerprints, recorded info)`` a reference cache of ``groups`` (one data file) is bound to:
    the model's content (``model`` from :func:`model_identity`), tokenizer, length policy, dtype and
    log-prob precision, and the tokenized sequences (not the rewards); info: log-prob implementation and
    the model's source."""
    from rao_megatron.data import sequence_key
    from rao_megatron.training.reference_cache import sequences_fingerprint, tokenizer_fingerprint

    fp = {"data": sequences_fingerprint(sequence_key(g.prompt_ids, y) for g in groups for y in g.responses),
          "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": str(cfg.data.max_length),
          "overlength": cfg.data.overlength, "model": model[0], "dtype": cfg.model.dtype,
          "logprob_precision": cfg.model.logprob_precision}
    info = {"info_logprob_impl": cfg.model.logprob_impl, "info_model_source": model[1]}
    return fp, info


def reference_cache_path(cfg: Config, data_path: str, *, heldout: bool = False) -> Path:
    """``data.reference_cache`` (the training file's cache; the held-out file's goes beside it as
    ``<name>.heldout.safetensors``), else the default path beside each data file."""
    from rao_megatron.training.reference_cache import default_cache_path

    if cfg.data.reference_cache:
        p = Path(cfg.data.reference_cache)
        return p.with_name(f"{p.stem}.heldout{p.suffix}") if heldout else p
    return default_cache_path(data_path)


def packing_settings(cfg: Config) -> dict[str, Any]:
    """The batcher's packing arguments from ``data.packing`` / ``data.micro_batch_tokens`` and the layout.

    Under expert parallelism every DP rank runs the same number of packed micro-batches (the MoE token
    dispatcher's collectives span DP ranks); the trainer, its step-0 check and ``precompute_reference``
    all build their batchers from here, so none of them can leave it out.
    """
    rows = cfg.data.micro_batch_tokens // cfg.data.max_length if cfg.data.micro_batch_tokens else None
    return {"packing": cfg.data.packing, "packed_rows": rows, "equal_micro_batches": cfg.parallel.ep > 1}
