"""What a run reads and how it is fed: its tokenizer, its tokenized training / held-out groups (tokenized once
into a shared store), and the batchers and log-prob settings built from the config for them (the trainer
and ``precompute_reference`` alike). Where its reference cache is and what binds it: :mod:`.reference`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from rao_megatron.config import Config, ConfigError
from rao_megatron.data import GroupBatcher, read_examples, sequence_key, split_heldout, tokenize_examples
from rao_megatron.data.packing import GroupTooLargeError
from rao_megatron.data.token_store import read_store, store_key, write_store
from rao_megatron.data.tokenize import check_special_tokens
from rao_megatron.data.tokenizer import load_tokenizer, template_roles
from rao_megatron.models.checkpoint import checkpoint_tokenizer
from rao_megatron.parallel.device import transformer_engine_on_cuda
from rao_megatron.parallel.startup import is_rank0, log0
from rao_megatron.training.forward_step import LogprobSettings
from rao_megatron.training.model_init import model_dir
from rao_megatron.training.reference_cache import file_fingerprint, tokenizer_fingerprint


def run_tokenizer_path(cfg: Config) -> str | None:
    """``model.tokenizer``, else the HF model directory, else the initial checkpoint's; None: the tiny tokenizer."""
    path = cfg.model.tokenizer or model_dir(cfg)
    if path is None and cfg.model.init_checkpoint:
        path = checkpoint_tokenizer(cfg.model.init_checkpoint)
    return str(Path(path).resolve()) if path is not None else None


def load_run_tokenizer(cfg: Config) -> Any:
    """The run's tokenizer (see :func:`run_tokenizer_path`)."""
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


def drops_tied(cfg: Config, spec: Any) -> bool:
    """Whether groups whose rewards all tie are dropped: ``data.drop_tied``, by default the loss's own rule
    (a pairwise loss finds no pair in them; the others train on them)."""
    return spec.pairwise if cfg.data.drop_tied is None else cfg.data.drop_tied


def _tokenize(path: str, cfg: Config, tokenizer: Any, spec: Any, t0: int | None) -> tuple[list[Any], Any, dict]:
    """Read, validate and tokenize one data file in this process: ``(groups, report, row labels)``."""
    examples = read_examples(path, reward_field=cfg.data.ultrafeedback_rating, roles=template_roles(tokenizer))
    labels = {ex.row: ex.where for ex in examples}
    groups, report = tokenize_examples(
        examples, tokenizer, max_length=cfg.data.max_length, overlength=cfg.data.overlength,
        max_responses=cfg.data.max_responses, min_responses=2 if spec.pairwise else 1,
        drop_tied=drops_tied(cfg, spec), t0=t0, source=path)
    return groups, report, labels


def token_store_path(cfg: Config, path: str, tokenizer: Any, spec: Any, t0: int | None) -> Path:
    """Where the tokenize-once store of ``path`` lives: under ``data.token_cache`` (default: beside the data
    file, ``<data>.tokens/``), named by everything the tokens depend on."""
    parts = {"data": file_fingerprint(path), "tokenizer": tokenizer_fingerprint(tokenizer),
             "max_length": cfg.data.max_length, "overlength": cfg.data.overlength,
             "max_responses": cfg.data.max_responses, "pairwise": spec.pairwise,
             "rating": cfg.data.ultrafeedback_rating, "t0": t0}
    if drops_tied(cfg, spec) != spec.pairwise:  # only then: the stores of every earlier run keep their names
        parts["drop_tied"] = drops_tied(cfg, spec)
    root = Path(cfg.data.token_cache) if cfg.data.token_cache else Path(f"{path}.tokens")
    return root / store_key(parts)


def _tokenized(path: str, cfg: Config, tokenizer: Any, spec: Any, t0: int | None,
               where: dict[str, dict[int, str]]) -> tuple[list[Any], Any]:
    """The tokenized groups of ``path``, tokenized once: global rank 0 builds the store (the others wait and
    get its verdict -- a data error is raised on every rank alike), then every rank memory-maps it. Where
    the store cannot be written (read-only data directory, no ``data.token_cache``) each rank tokenizes
    for itself, as before."""
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
    if not cfg.data.train_path:
        raise ConfigError("config key 'data.train_path' is not set: give a JSONL/Parquet file or a dataset")
    where: dict[str, dict[int, str]] = {}
    groups, report = _tokenized(cfg.data.train_path, cfg, tokenizer, spec, None, where)
    check_special_tokens(report, cfg.data.special_tokens_in_text)
    if not groups:
        raise ConfigError(f"no usable groups in {cfg.data.train_path}: "
                          + "; ".join(line.strip() for line in report.summary().splitlines()))
    if spec.needs_rewards and groups[0].rewards is None:
        raise ConfigError(f"loss '{spec.name}' needs rewards, but {cfg.data.train_path} has none "
                          "(annotate it: python -m rao_megatron.cli.annotate)")
    t0 = report.t0
    if cfg.data.eval_path:
        heldout, heldout_report = _tokenized(cfg.data.eval_path, cfg, tokenizer, spec, t0, where)
        check_special_tokens(heldout_report, cfg.data.special_tokens_in_text)
        run = RunGroups(groups, heldout, report, heldout_report, t0, where)
    else:
        train, heldout = split_heldout(groups, cfg.data.eval_fraction, cfg.data.seed)
        run = RunGroups(train, heldout, report, None, t0, where)
    run.warnings = data_warnings(cfg, run.train, run.heldout, where)
    return run


def packing_settings(cfg: Config, *, moe: bool = False, hidden: int | None = None) -> dict[str, Any]:
    """The batcher's packing arguments from ``data.packing`` / ``data.micro_batch_tokens`` /
    ``data.shared_prompt`` and the layout (``moe``: the model routes tokens to experts; ``hidden``: its hidden
    size, which weighs attention against the linear layers when the batcher chooses the layout).

    Under expert parallelism every DP rank runs the same number of packed micro-batches (the MoE token
    dispatcher's collectives span DP ranks); the trainer, its step-0 check and ``precompute_reference``
    all build their batchers from here, so none of them can leave it out.
    """
    rows = cfg.data.micro_batch_tokens // cfg.data.max_length if cfg.data.micro_batch_tokens else None
    return {"packing": cfg.data.packing, "packed_rows": rows, "equal_micro_batches": cfg.parallel.ep > 1,
            "shared_prompt": shared_prompt(cfg, moe=moe), "layout_hidden": hidden}


def shared_prompt(cfg: Config, *, moe: bool = False) -> bool | None:
    """Whether packed groups hold their prompt once (``data.shared_prompt``): True, False, or None -- where it
    is exact, the batcher chooses by the cost of each layout on the data (``GroupBatcher._choose_layout``).

    It needs an attention mask (each response sees its prompt and itself): the local spec takes one (the
    CPU, or CUDA without Transformer Engine); TE's THD attention takes boundaries only, so under TE a group
    runs one prompt per response -- FlexAttention could take the mask, but it is not among the attention
    backends Megatron-Core's TE spec can run, and the unfused path would give back the time the prompt saves.
    An MoE model's load-balancing statistics count each prompt token once instead of once per response, so
    there the default stays off (true is taken: the log-probs are the same, the auxiliary loss is not).
    """
    asked = cfg.data.shared_prompt
    if not cfg.data.packing:
        return False
    if transformer_engine_on_cuda():
        if asked:
            raise ConfigError("config key 'data.shared_prompt': the shared-prompt layout needs an attention mask, "
                              "and Transformer Engine's packed (THD) attention takes none; leave it unset (one "
                              "prompt per response on CUDA) or set data.packing=false")
        return False
    if asked is None:
        return False if moe else None
    return bool(asked)


def group_batcher(cfg: Config, groups: Sequence[Any], *, source: str, pad_id: int, dp_rank: int, dp_size: int,
                  global_batch_groups: int | None = None, responses_per_group: int | None = None,
                  reference: Any = None, arch: Any = None) -> GroupBatcher:
    """A batcher of ``groups`` (from the data file ``source``, which an error names) laid out as the config
    says: ``data.max_length``, ``data.groups_per_micro_batch``, ``data.seed`` and :func:`packing_settings`.

    ``global_batch_groups``: the training stream's groups per step; None: a pass in data order (held-out
    evaluation, ``precompute_reference``), ``dp_size × data.groups_per_micro_batch`` groups a step.
    ``responses_per_group`` None: the most of any group in ``groups``. ``arch``: the model's architecture (an MoE
    model keeps one prompt per response unless told; its hidden size weighs the shared-prompt layout's cost). A batcher the config cannot build is
    a :class:`ConfigError` naming the keys (or the data file and row of a group too large to pack).
    """
    gpm = cfg.data.groups_per_micro_batch
    step = dp_size * gpm if global_batch_groups is None else global_batch_groups
    try:
        return GroupBatcher(groups, seq_length=cfg.data.max_length, pad_id=pad_id, groups_per_micro_batch=gpm,
                            global_batch_groups=step, dp_rank=dp_rank, dp_size=dp_size,
                            responses_per_group=responses_per_group, seed=cfg.data.seed, reference=reference,
                            **packing_settings(cfg, moe=arch is not None and arch.moe is not None,
                                               hidden=arch.hidden_size if arch is not None else None))
    except GroupTooLargeError as e:
        raise ConfigError(f"{source}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"config keys 'train.global_batch_groups' / 'data.groups_per_micro_batch': {e}") from None


def build_batchers(cfg: Config, groups: RunGroups, *, pad_id: int, dp_rank: int, dp_size: int,
                   references: tuple[Any, Any] = (None, None),
                   arch: Any = None) -> tuple[GroupBatcher, GroupBatcher | None]:
    """The trainer's ``(training stream, held-out pass or None)`` on this DP rank, with the reference caches
    ``(training, held-out)`` (None: on the fly or not needed). Both lay out as many rows per group as the
    largest group of either has; the held-out pass is :func:`group_batcher`'s (the one ``precompute_reference``
    runs over each file)."""
    k = max(len(x.responses) for x in groups.train + groups.heldout)
    common: dict[str, Any] = dict(pad_id=pad_id, dp_rank=dp_rank, dp_size=dp_size, responses_per_group=k, arch=arch)
    heldout_source = cfg.data.eval_path or cfg.data.train_path
    train = group_batcher(cfg, groups.train, source=cfg.data.train_path,
                          global_batch_groups=cfg.train.global_batch_groups, reference=references[0], **common)
    heldout = (group_batcher(cfg, groups.heldout, source=heldout_source, reference=references[1], **common)
               if groups.heldout else None)
    return train, heldout


def logprob_settings(cfg: Config) -> LogprobSettings:
    """How per-token log-probs are computed (``model.logprob_impl`` / ``logprob_precision`` /
    ``logprob_chunk_size``): for training, the step-0 check and ``precompute_reference`` alike."""
    return LogprobSettings(impl=cfg.model.logprob_impl, precision=cfg.model.logprob_precision,
                           chunk_size=cfg.model.logprob_chunk_size)
