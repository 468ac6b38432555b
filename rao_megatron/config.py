"""Run configuration: dataclasses per concern, loaded from YAML with ``section.key=value`` overrides.

    cfg = load_config("examples/configs/rao_tiny.yaml", ["loss.beta=0.1", "train.lr=5e-7"])

Every field carries its help text; types, ranges and choices are checked, and an unknown key is
reported with the close matches. Errors are :class:`ConfigError` naming the key (and the file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import math
import os
import re
import shutil
import sys
import tempfile
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and, where known, the file."""


def _f(default: Any, help: str, *, choices: tuple | None = None, gt: float | None = None,
       ge: float | None = None, lt: float | None = None, le: float | None = None, path: bool = False) -> Any:
    """A config field with its help text and checks; ``path=True``: a file or directory, whose ``~`` and
    ``$VARIABLES`` are expanded when it is set (:func:`expand_path`)."""
    meta = {"help": help, "choices": choices, "gt": gt, "ge": ge, "lt": lt, "le": le, "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    hf_config: str | None = _f(None, "HF model directory or config.json the architecture is read from "
                                     "(Llama family, Qwen2, Qwen3, Qwen3-MoE); None uses `preset`.", path=True)
    preset: str | None = _f("tiny-llama", "Built-in tiny architecture for tests and tiny runs.",
                            choices=("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-qwen3-moe", None))
    init_checkpoint: str | None = _f(None, "Megatron checkpoint directory to initialise from; None = random init.",
                                     path=True)
    tokenizer: str | None = _f(None, "HF tokenizer directory; None = the model directory (or the tiny test "
                                     "tokenizer).", path=True)
    dtype: str = _f("fp32", "Parameter and compute dtype.", choices=("fp32", "bf16"))
    logprob_impl: str = _f("chunked", "Vocab-parallel log-prob implementation.",
                           choices=("reference", "chunked", "triton"))
    logprob_precision: str = _f("fp32", "Matmul precision of the log-prob kernel (fp8 needs Hopper).",
                                choices=("fp32", "bf16", "fp8"))
    logprob_chunk_size: int = _f(1024, "Tokens per chunk in the fused log-prob kernel.", gt=0)
    moe_aux_loss_coeff: float | None = _f(None, "MoE models: coefficient of the router load-balancing loss "
                                                "(Megatron's per-layer switch loss) added to the training loss; "
                                                "None = the HF config's router_aux_loss_coef; 0 = off.", ge=0)


@dataclass
class ParallelConfig:
    tp: int = _f(1, "Tensor-parallel size (must divide attention heads and KV groups).", ge=1)
    pp: int = _f(1, "Pipeline-parallel size (must divide the number of layers).", ge=1)
    ep: int = _f(1, "Expert-parallel size (MoE models; must divide the experts): each rank holds 1/ep of the "
                    "experts; taken from the data-parallel ranks (world divisible by etp x ep x pp).", ge=1)
    etp: int | None = _f(None, "Expert tensor-parallel size (MoE; must divide the expert FFN width); None = tp.",
                         ge=1)
    vpp: int | None = _f(None, "Virtual pipeline stages per rank (interleaved schedule); None = off.", ge=1)
    sequence_parallel: bool = _f(False, "Megatron sequence parallelism: needs tp > 1 and the Transformer Engine "
                                        "layer spec (CUDA); refused otherwise.")
    backend: str | None = _f(None, "torch.distributed backend; None = nccl with CUDA, gloo without.",
                             choices=("nccl", "gloo", None))
    device: str = _f("auto", "cuda: stop unless this interpreter's torch sees a GPU; cpu: CPU only (gloo); "
                             "auto: CUDA when visible, else CPU.", choices=("auto", "cuda", "cpu"))
    distributed_optimizer: bool | None = _f(None, "Megatron's distributed optimizer (optimizer state sharded over "
                                                  "DP ranks); None = on with CUDA, off on CPU.")


@dataclass
class LossConfig:
    name: str = _f("rao", "Loss from the registry: rao, dpo, ipo, slic, simpo, orpo, rpo, cal_dpo, sft, grao, bt.")
    beta: float | None = _f(None, "β: KL / temperature coefficient (loss default when unset).", gt=0)
    log_z0: float | None = _f(None, "RAO: log Z0, the prefix normaliser; None = derived from the training set's "
                                    "rewards (docs/rao.md: min(mean r/β, lowest best-of-group r/β)).")
    z0: float | None = _f(None, "RAO: Z0 > 0, convenience for log_z0 = ln z0 (give one of the two).", gt=0)
    reward_scale: float | None = _f(None, "RAO: multiply explicit rewards before the loss (default 1).", gt=0)
    reward_shift: float | None = _f(None, "RAO: add to explicit rewards after scaling (default 0).")
    prefix_consistency: bool | None = _f(None, "RAO: the older spelling of log_z: true = prefix (log_z0 + sg(Δ_P), "
                                               "the paper's Eq. 6), false = fixed (log_z0; an ablation).")
    log_z: str | None = _f(None, "RAO: each group's log Z. prefix: log_z0 + sg(Δ_P), the paper's Algorithm 1 (the "
                                 "default); fixed: log_z0; sampled: the log-mean-exp of the group's own r/β (its "
                                 "responses sampled from the reference model; docs/rao.md); sampled_prefix: that "
                                 "+ sg(Δ_P). Replaces prefix_consistency (give one of the two).",
                           choices=("prefix", "fixed", "sampled", "sampled_prefix", None))
    label_smoothing: float | None = _f(None, "DPO: label smoothing ε (cDPO / robust DPO).", ge=0, lt=0.5)
    gamma: float | None = _f(None, "SimPO: target reward margin γ.")
    lam: float | None = _f(None, "ORPO: weight of the odds-ratio term; GRAO: weight of the alignment term.", ge=0)
    advantage_norm: str | None = _f(None, "GRAO: advantages over the G samples and the reference answer with an "
                                          "unbiased std (group, the default) or the paper's Eq. 4: the G samples' "
                                          "mean and population std (samples; docs in losses/grao.py).",
                                    choices=("group", "samples", None))
    margin: float | None = _f(None, "BT reward model: margin subtracted from the score difference.")
    centering: float | None = _f(None, "BT reward model: coefficient of the (s_w + s_l)² centering term.", ge=0)
    pairing: str | None = _f(None, "Pairs from groups of K > 2: best_vs_rest (default) or all_pairs.",
                             choices=("best_vs_rest", "all_pairs", None))
    reward_normalization: str = _f("minmax", "Map the explicit rewards before every loss that uses them, with "
                                             "statistics of the training set: minmax to [0, 1], zscore to mean 0 "
                                             "and std 1, or none (raw values).",
                                   choices=("none", "zscore", "minmax"))
    reward_stats: dict[str, Any] | None = _f(None, "Training-set reward statistics behind reward_normalization and "
                                                   "RAO's log_z0 (filled in at start-up and saved in the run's "
                                                   "config and checkpoints; a resumed run keeps them; set to pin).")

    #: LossConfig fields that configure the run's reward calibration, not keyword arguments of the loss
    CALIBRATION_FIELDS = ("reward_normalization", "reward_stats")

    def hparams(self) -> dict[str, Any]:
        """The hyper-parameters that were set (the loss's own defaults apply to the rest)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("name", *self.CALIBRATION_FIELDS) and getattr(self, f.name) is not None}

    def build(self) -> Any:
        """The registry loss with these hyper-parameters, checked (a ``BoundLoss``), calibrated by
        ``reward_stats`` when they are known: rewards mapped by ``reward_normalization``, and the loss's own
        ``calibrate`` hook deriving what it derives from them (RAO: ``log_z0``, when neither ``log_z0`` nor ``z0``
        is set; ``losses.calibration``)."""
        from rao_megatron.losses import get_loss  # heavy: torch; config.py alone loads none
        from rao_megatron.losses.calibration import RewardStats, normalization_affine

        spec = get_loss(self.name)
        stats = RewardStats.from_dict(self.reward_stats) if self.reward_stats else None
        affine = normalization_affine(self.reward_normalization, stats) if spec.needs_rewards else (1.0, 0.0)
        return spec.bind(self.hparams(), reward_affine=affine, reward_stats=stats)


@dataclass
class DataConfig:
    train_path: str | None = _f(None, "Training data: JSONL/Parquet file, a directory of them, or a `datasets` "
                                       "name.", path=True)
    eval_path: str | None = _f(None, "Held-out data; None = split `eval_fraction` off the training data.",
                               path=True)
    eval_fraction: float = _f(0.05, "Share of rows held out when eval_path is unset.", ge=0, lt=1)
    max_length: int = _f(512, "Fixed sequence length (prompt + response) in tokens.", gt=1)
    overlength: str = _f("drop", "Responses longer than max_length: drop them (counted), truncate them, or "
                                 "stop with an error naming the row.", choices=("drop", "truncate", "error"))
    groups_per_micro_batch: int = _f(1, "Padded layout: whole prompt groups per micro-batch.", ge=1)
    packing: bool = _f(True, "Pack several sequences into each row of max_length tokens (whole groups per "
                             "micro-batch; attention never crosses a sequence); false pads every sequence to "
                             "max_length.")
    micro_batch_tokens: int | None = _f(None, "Packed layout: token slots per micro-batch, a multiple of max_length "
                                              "(rows = micro_batch_tokens / max_length); None = the padded layout's "
                                              "groups_per_micro_batch x responses per group x max_length.", gt=0)
    shared_prompt: bool | None = _f(None, "Packed layout: each group's prompt once, then its responses, each "
                                          "attending to the prompt and itself only (positions continue from the "
                                          "prompt), instead of one prompt per response. None = where it is exact "
                                          "(packing on a dense model whose attention takes a mask: not Transformer "
                                          "Engine's THD on CUDA, which keeps one prompt per response) and costs "
                                          "less on the data; true = always there; true on THD is refused.")
    max_responses: int | None = _f(None, "Keep at most this many responses per group (best and worst first).", ge=2)
    drop_tied: bool | None = _f(None, "Drop groups whose rewards all tie (counted in the data report), for any loss; "
                                      "None = the loss's own rule (pairwise losses drop them, they hold no pair; "
                                      "the others keep them). Pairwise losses cannot keep them.")
    ultrafeedback_rating: str = _f("overall", "Raw UltraFeedback rows: the reward is completions[].overall_score, "
                                   "or the mean of the fine-grained annotation ratings (N/A skipped).",
                                   choices=("overall", "fine_grained"))
    token_store: bool = _f(True, "Tokenize each data file once into memory-mapped int32 arrays shared by every "
                                 "rank and command (rebuilt when the data, tokenizer or length policy change).")
    token_cache: str | None = _f(None, "Directory of the tokenize-once stores; None = beside the data file "
                                       "(<data>.tokens/).", path=True)
    reference_cache: str | None = _f(None, "Precomputed reference log-probs; None = beside the data, if present.",
                                     path=True)
    special_tokens_in_text: str = _f("warn", "Row text (prompt or response) that spells one of the tokenizer's "
                                             "special tokens (`<|im_end|>`, `<|eot_id|>`): the tokenizer turns it "
                                             "into that control token. warn: count the rows and name the first; "
                                             "refuse: stop with an error naming file, row and field.",
                                     choices=("warn", "refuse"))
    seed: int = _f(1234, "Shuffle seed.")


@dataclass
class TrainConfig:
    task: str = _f("policy", "What is trained: a policy with a preference loss, a reward model, or SFT.",
                   choices=("policy", "rm", "sft"))
    output_dir: str = _f("runs/default", "Metrics, TensorBoard logs, plots and checkpoints go here.", path=True)
    steps: int = _f(100, "Optimizer steps.", ge=1)
    global_batch_groups: int = _f(8, "Prompt groups per optimizer step (across data-parallel ranks).", ge=1)
    lr: float = _f(5e-7, "Peak learning rate.", gt=0)
    min_lr: float = _f(0.0, "Final learning rate of the cosine decay.", ge=0)
    schedule_steps: int | None = _f(None, "Steps of the LR schedule (warm-up + cosine decay); None = train.steps. "
                                          "Longer than train.steps when a run is continued in parts (the online "
                                          "loop's rounds); a resumed run keeps its checkpoint's schedule.", ge=1)
    warmup_steps: int = _f(0, "Linear warm-up steps.", ge=0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0)
    adam_beta1: float = _f(0.9, "Adam β1.", ge=0, lt=1)
    adam_beta2: float = _f(0.95, "Adam β2.", ge=0, lt=1)
    clip_grad: float = _f(1.0, "Global gradient-norm clip; 0 disables.", ge=0)
    eval_every: int = _f(0, "Evaluate on held-out data every N steps; 0 = only at the end.", ge=0)
    log_every: int = _f(1, "Console log interval in steps.", ge=1)
    seed: int = _f(1234, "Model-init and dropout seed.")
    reference: str = _f("auto", "Reference log-probs: cached (required), on_the_fly (reference model in "
                                "memory), adapters_off (peft.method=lora: the model itself with its adapters "
                                "switched off, no copy and no cache), or auto (LoRA: adapters_off; else the cache "
                                "if present, else on the fly).",
                        choices=("auto", "cached", "on_the_fly", "adapters_off"))
    max_bad_steps: int = _f(3, "Abort after this many non-finite steps in a row.", ge=1)


@dataclass
class CheckpointConfig:
    save_every: int = _f(0, "Save every N steps; 0 = only at the end.", ge=0)
    keep_last: int = _f(2, "Checkpoints kept (older ones deleted).", ge=1)
    resume: str = _f("auto", "auto: resume the newest complete checkpoint in train.output_dir if this run wrote "
                             "it (same train.task, loss and loss settings, initial model, global batch, data seed "
                             "and data), else stop naming what changed; fresh: start afresh in train.output_dir, "
                             "deleting its checkpoints and metrics (none: the same); or a checkpoint directory to "
                             "resume (checked the same way).", path=True)
    allow_changed_run: bool = _f(False, "Resume a checkpoint that another run wrote (other task, loss or loss "
                                        "settings, initial model, global batch, data seed or data) on purpose: "
                                        "its weights, optimizer, LR schedule and step carry over, the data stream "
                                        "goes on from its position (on other data: from that data's beginning), "
                                        "and what changed is printed.")
    save_at_end: bool = _f(True, "Save after the last step.")


#: Megatron names of the linears LoRA can adapt, in every layer (HF: q/k/v_proj, o_proj, gate/up_proj, down_proj)
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class PeftConfig:
    method: str = _f("none", "Parameter-efficient fine-tuning: none trains every weight; lora trains low-rank "
                             "adapters on the target linears only (the base frozen; its reference is the base: "
                             "train.reference=adapters_off).", choices=("none", "lora"))
    rank: int = _f(16, "LoRA rank r.", gt=0)
    alpha: float = _f(32.0, "LoRA alpha: the adapter's output is scaled by alpha / rank.", gt=0)
    dropout: float = _f(0.0, "Dropout on the adapter's input (training only).", ge=0, lt=1)
    target_modules: list = _f(list(LORA_TARGETS), "Linears that get adapters, in Megatron names: linear_qkv "
                                                  "(q/k/v), linear_proj (o), linear_fc1 (gate/up), linear_fc2 "
                                                  "(down); a list or a comma-separated string.")
    experts: bool = _f(True, "MoE models: the routed experts' linear_fc1 / linear_fc2 get adapters too.")


@dataclass
class OnlineConfig:
    samples: int = _f(4, "Online rounds (rao-online): G, answers sampled per prompt and round.", ge=1)
    temperature: float = _f(0.8, "Online rounds: sampling temperature (the GRAO paper: 0.7).", gt=0)
    max_new_tokens: int = _f(64, "Online rounds: longest sampled answer in tokens.", ge=1)
    reference_answer: str = _f("given", "Online GRAO: the reference answer y of a group: the prompt row's "
                                        "`reference` (given), or the group's best-rewarded sample when it earns "
                                        "at least the given one's reward (best_sample).",
                               choices=("given", "best_sample"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


def _coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    """Convert ``value`` to the annotated type or raise naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        return _coerce(key, value, args[0], where)
    if value is None:
        raise ConfigError(f"config key '{key}'{where} must be {hint.__name__}, got null")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-7" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif hint is list or origin is list:
        if isinstance(value, str):  # "a,b" on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key '{key}'{where} must be {hint.__name__}, got {value!r}")


def _check_range(key: str, value: Any, meta: dict, where: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join(str(c) for c in choices if c is not None)
        raise ConfigError(f"config key '{key}'{where} must be one of {shown}; got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}'{where} must be finite, got {value!r}")
        for op, bound, ok in (("gt", ">", lambda a, b: a > b), ("ge", ">=", lambda a, b: a >= b),
                              ("lt", "<", lambda a, b: a < b), ("le", "<=", lambda a, b: a <= b)):
            b = meta.get(op)
            if b is not None and not ok(value, b):
                raise ConfigError(f"config key '{key}'{where} must be {bound} {b}, got {value!r}")


def _apply(cfg: Config, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    sections = _section_types()
    if parts[0] not in sections:
        close = difflib.get_close_matches(parts[0], list(sections), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown config section '{parts[0]}' in key '{key}'{where} "
                          f"(sections: {', '.join(sections)}){hint}")
    if len(parts) != 2:
        raise ConfigError(f"config key '{key}'{where} must be <section>.<field>, e.g. loss.beta")
    section, name = parts
    stype = sections[section]
    fields_ = {f.name: f for f in dataclasses.fields(stype)}
    if name not in fields_:
        raise _unknown(key, [f"{section}.{n}" for n in fields_], where)
    hint = typing.get_type_hints(stype)[name]
    coerced = _coerce(key, value, hint, where)
    meta = dict(fields_[name].metadata)
    _check_range(key, coerced, meta, where)
    if meta.get("path") and isinstance(coerced, str):
        try:
            coerced = expand_path(coerced)
        except ValueError as e:
            raise ConfigError(f"config key '{key}'{where}: {e}") from None
    setattr(getattr(cfg, section), name, coerced)


def _flatten(data: Any, path: str, where: str = "") -> list[tuple[str, Any]]:
    if not isinstance(data, dict):
        what = f"section '{path}'" if path else "file"
        raise ConfigError(f"config {what}{where} must be a mapping of keys (section: {{key: value}}), "
                          f"got {type(data).__name__}")
    out: list[tuple[str, Any]] = []
    for k, v in data.items():
        key = f"{path}.{k}" if path else str(k)
        if not path and key in SECTIONS and v is None:
            continue  # `checkpoint:` with every key commented out: an empty section, all defaults
        if isinstance(v, dict) and not path:
            out.extend(_flatten(v, key, where))
        elif not path and key in SECTIONS:
            raise ConfigError(f"config section '{key}'{where} must be a mapping of keys, got "
                              f"{type(v).__name__} {v!r}")
        else:
            out.append((key, v))
    return out


def _yaml_error(p: Path, e: yaml.YAMLError) -> ConfigError:
    """PyYAML's error as one line with the file, line and column (PyYAML counts from 0)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
    context = getattr(e, "context", None)
    return ConfigError(f"config file {p} is not valid YAML: {at}{problem}" + (f" ({context})" if context else ""))


def _duplicate_keys(node: yaml.Node, path: str, p: Path, seen_nodes: set[int]) -> None:
    """Refuse a key given twice in one mapping of the YAML node tree (PyYAML keeps the last one silently)."""
    if id(node) in seen_nodes:  # an alias: the anchored node was checked where it was defined
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            full = f"{path}.{key}" if path and key is not None else (key or path)
            if key is not None and key != "<<":
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise ConfigError(f"config file {p}: key '{full}' is given twice (line {lines[key]} and line "
                                      f"{line}); keep one")
                lines[key] = line
            _duplicate_keys(value_node, full, p, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _duplicate_keys(item, path, p, seen_nodes)


def _load_yaml(text: str, p: Path) -> Any:
    """``yaml.safe_load(text)``, refusing duplicate keys (one line naming the key and both lines)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _duplicate_keys(node, "", p, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[str, Any]:
    """``"loss.beta=0.1"`` -> ``("loss.beta", 0.1)`` (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. loss.beta=0.1)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def validate(cfg: Config, where: str = "", cli_keys: frozenset[str] = frozenset()) -> Config:
    """Cross-field checks that one field alone cannot make.

    A loss hyper-parameter the chosen loss does not use is an error when given on the command line; when
    it comes from the YAML file (a config written for another loss, run with ``loss.name=...``), it is
    dropped with a note, so one file serves every loss.
    """
    from rao_megatron.losses import get_loss  # heavy: torch

    try:
        spec = get_loss(cfg.loss.name)
    except ValueError as e:
        raise ConfigError(f"config key 'loss.name'{where}: {e}") from None
    for key in cfg.loss.hparams():
        if key in spec.hparams:
            continue
        if f"loss.{key}" in cli_keys or not where:
            raise ConfigError(f"config key 'loss.{key}'{where or ' (command-line override)'}: loss "
                              f"'{spec.name}' does not use it (it takes: {', '.join(spec.hparams) or 'none'})")
        setattr(cfg.loss, key, None)
        if os.environ.get("RANK", "0") == "0":
            print(f"note: loss.{key}{where} is not used by loss '{spec.name}'; ignored", file=sys.stderr)
    if clash := spec.exclusive_clash(cfg.loss.hparams()):
        keys = " and ".join(f"'loss.{k}'" for k in clash)
        hint = "give one of the two, not both" if len(clash) == 2 else "give one of them"
        raise ConfigError(f"config keys {keys}{where}: {hint}")
    if cfg.loss.reward_stats is not None:
        from rao_megatron.losses.calibration import RewardStats  # heavy: torch

        try:
            RewardStats.from_dict(cfg.loss.reward_stats)
        except ValueError as e:
            raise ConfigError(f"config key 'loss.reward_stats'{where}: {e}") from None
    if spec.pairwise and cfg.data.drop_tied is False:
        raise ConfigError(f"config key 'data.drop_tied'{where}: loss '{spec.name}' trains on pairs, and a group "
                          "whose rewards all tie holds none; leave data.drop_tied unset (or true)")
    expected = {"rm": "bt", "sft": "sft"}.get(cfg.train.task)
    if expected and cfg.loss.name != expected:
        raise ConfigError(f"config key 'loss.name'{where}: train.task={cfg.train.task} trains with loss "
                          f"'{expected}', got '{cfg.loss.name}'")
    if cfg.train.task == "policy" and cfg.loss.name == "bt":
        raise ConfigError(f"config key 'loss.name'{where}: 'bt' trains a reward model; set train.task=rm")
    if cfg.parallel.sequence_parallel and cfg.parallel.tp < 2:
        raise ConfigError(f"config key 'parallel.sequence_parallel'{where}: needs parallel.tp > 1 (it splits the "
                          f"sequence over the tensor-parallel group), got tp={cfg.parallel.tp}")
    if cfg.parallel.device == "cpu" and cfg.parallel.backend == "nccl":
        raise ConfigError(f"config key 'parallel.backend'{where}: nccl needs CUDA, but parallel.device=cpu")
    etp_set = cfg.parallel.etp is not None and cfg.parallel.etp != cfg.parallel.tp
    expert_key = "parallel.ep" if cfg.parallel.ep > 1 else "parallel.etp" if etp_set else None
    dense_preset = cfg.model.preset in ("tiny-llama", "tiny-qwen2", "tiny-qwen3")
    if expert_key and dense_preset and not (cfg.model.hf_config or cfg.model.init_checkpoint):
        # a model read from a file is checked once it is known (experts divisible by ep, MoE at all)
        raise ConfigError(f"config key '{expert_key}'{where}: model.preset={cfg.model.preset} is dense; expert "
                          "parallelism needs a mixture-of-experts model (tiny-qwen3-moe, a Qwen3-MoE checkpoint)")
    if cfg.data.micro_batch_tokens is not None and cfg.data.micro_batch_tokens % cfg.data.max_length:
        raise ConfigError(f"config key 'data.micro_batch_tokens'{where}: {cfg.data.micro_batch_tokens} is not a "
                          f"multiple of data.max_length={cfg.data.max_length} (a micro-batch is whole rows)")
    if cfg.parallel.sequence_parallel:
        _check_sequence_parallel_tokens(cfg, where)
    _check_peft(cfg, where)
    if cfg.train.min_lr > cfg.train.lr:
        raise ConfigError(f"config key 'train.min_lr'{where} ({cfg.train.min_lr}) must be <= train.lr ({cfg.train.lr})")
    _check_outputs_apart(cfg, where)
    if cfg.model.hf_config is None and cfg.model.preset is None and cfg.model.init_checkpoint is None:
        # a converted checkpoint records its HF architecture (rao_model.json); otherwise one is needed
        raise ConfigError(f"config key 'model.hf_config'{where}: set it, model.preset or model.init_checkpoint")
    return cfg


def _check_peft(cfg: Config, where: str = "") -> None:
    """The LoRA settings: known target modules, at least one; adapters_off only with LoRA."""
    targets = cfg.peft.target_modules
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        got = f"unknown {', '.join(repr(t) for t in unknown)}" if unknown else "none given"
        raise ConfigError(f"config key 'peft.target_modules'{where}: {got}; choose among "
                          f"{', '.join(LORA_TARGETS)}")
    if cfg.train.reference == "adapters_off" and cfg.peft.method != "lora":
        raise ConfigError(f"config key 'train.reference'{where}: adapters_off is the base model of a LoRA run; "
                          "set peft.method=lora, or train.reference=auto / cached / on_the_fly")


#: config keys a run (or ``precompute_reference``) writes, and those it only reads
OUTPUT_KEYS = ("train.output_dir", "data.token_cache", "data.reference_cache")
INPUT_KEYS = ("data.train_path", "data.eval_path", "model.hf_config", "model.init_checkpoint", "model.tokenizer")


def _check_outputs_apart(cfg: Config, where: str = "") -> None:
    """An output key that names the same file or directory as an input key would be written over it: refused."""
    def value(key: str) -> str | None:
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    for out_key in OUTPUT_KEYS:
        out = value(out_key)
        for in_key in INPUT_KEYS:
            source = value(in_key)
            if out is not None and source is not None and same_path(out, source):
                raise ConfigError(f"config keys '{out_key}' and '{in_key}'{where} name the same path {source}: "
                                  f"the run would write over its input; set {out_key} to another path")


def _check_sequence_parallel_tokens(cfg: Config, where: str = "") -> None:
    """Sequence parallelism splits each micro-batch's tokens over the TP ranks, so their count must divide by
    ``parallel.tp``: a padded row's ``data.max_length``; a packed micro-batch (one THD sequence of rows x
    max_length tokens): ``data.micro_batch_tokens``, or -- when the row count follows the data (groups per
    micro-batch x responses per group) -- max_length itself."""
    tp, length, tokens = cfg.parallel.tp, cfg.data.max_length, cfg.data.micro_batch_tokens
    both = math.lcm(length, tp)
    if cfg.data.packing and tokens is not None:
        if tokens % tp:
            raise ConfigError(f"config key 'data.micro_batch_tokens'{where}: sequence parallelism splits each packed "
                              f"micro-batch's {tokens} tokens over parallel.tp={tp} ranks; set data.micro_batch_tokens "
                              f"to a multiple of {both} (of data.max_length={length} and parallel.tp={tp})")
    elif length % tp:
        what, fix = ((f"each packed micro-batch (rows of data.max_length={length} tokens, as many as the data "
                      "needs)", f"set data.max_length to a multiple of {tp}, or data.micro_batch_tokens to a "
                      f"multiple of {both}") if cfg.data.packing else
                     (f"each padded row's {length} tokens", f"set data.max_length to a multiple of {tp}"))
        raise ConfigError(f"config key 'data.max_length'{where}: sequence parallelism splits {what} over "
                          f"parallel.tp={tp} ranks; {fix}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then ``section.key=value`` overrides; validated."""
    cfg = Config()
    if path is not None:
        try:
            p = Path(expand_path(str(path)))
        except ValueError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        if p.is_dir():
            raise ConfigError(f"config file {p} is a directory, not a YAML file")
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = _load_yaml(p.read_bytes().decode("utf-8"), p)
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                              f"{e.start}): a binary file, or another encoding?") from None
        except yaml.YAMLError as e:
            raise _yaml_error(p, e) from None
        for key, value in _flatten({} if data is None else data, "", f" in {p}"):
            _apply(cfg, key, value, f" in {p}")
    cli_keys = set()
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, key, value, " (command-line override)")
        cli_keys.add(key)
    return validate(cfg, f" in {path}" if path else "", frozenset(cli_keys))


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back to the same Config)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe() -> str:
    """Every key with its default and help text (the reference printed by ``--help-config``)."""
    lines = []
    for section, stype in _section_types().items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(stype):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


class WriteError(ValueError):
    """An output that could not be written (disk full, quota, permissions, I/O error): one line naming the
    path and the operating system's cause; what was there before is left as it is."""


#: how torch's zip writer reports a failed write (torch.save, torch.distributed.checkpoint): no errno survives
_TORCH_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter failed", "unexpected pos", "file write failed")
#: an errno kept only as text: Rust I/O errors (safetensors: ``Os { code: 28, kind: StorageFull, ... }``) and
#: Python's ``[Errno 28] ...`` in a message (Megatron pickles each rank's failure, losing its cause)
_TEXT_ERRNO = re.compile(r"(?:Os \{ code: |os error |\[Errno )(\d+)")
#: below this many free bytes a write that failed without an errno is taken for a full disk
LOW_SPACE_BYTES = 64 << 20


def _error_chain(e: BaseException) -> list[BaseException]:
    """``e``, its causes and contexts, and every rank's failure of a torch.distributed.checkpoint
    ``CheckpointException`` (``failures``: rank -> (exception, traceback))."""
    out: list[BaseException] = []
    todo: list[Any] = [e]
    while todo:
        x = todo.pop(0)
        if not isinstance(x, BaseException) or any(x is y for y in out):
            continue
        out.append(x)
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return out


def _free_bytes(path: str | os.PathLike) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def write_failure(e: BaseException, path: str | os.PathLike) -> str | None:
    """Why a write to ``path`` failed, in the operating system's words (``No space left on device``), when
    ``e`` is a failed write; None for any other error.

    The OSError may sit anywhere in the chain (torch wraps it in ``RuntimeError: [enforce fail at
    inline_container.cc] ... unexpected pos``; Megatron's checkpoint writer in a ``CheckpointException`` of
    every rank's failure). Where the errno is lost (``torch.save`` to a path), a nearly full file system is
    the cause, else the library's own line is given.
    """
    chain = _error_chain(e)
    for x in chain:
        if isinstance(x, OSError) and x.errno is not None and not isinstance(x, ConnectionError):
            return x.strerror or os.strerror(x.errno)
    for x in chain:
        m = _TEXT_ERRNO.search(str(x))
        if m:
            return os.strerror(int(m.group(1)))
    torch_write = next((str(x).splitlines()[0] for x in chain
                        if any(t in str(x) for t in _TORCH_WRITE_FAILURES)), None)
    # Megatron raises the gathered failures on the coordinator, an empty CheckpointException on the other ranks
    other_rank = any(type(x).__name__ == "CheckpointException" and not getattr(x, "failures", None) for x in chain)
    if torch_write is None and not other_rank:
        return None  # not a failed write (a bug in a writer, an interrupt): raised as it is
    free = _free_bytes(path)
    if free is not None and free < LOW_SPACE_BYTES:
        return f"{os.strerror(errno.ENOSPC)} ({free >> 20} MiB free)"
    if torch_write is None:
        return "another rank's write failed (the first rank's error names the cause)"
    return f"the write failed ({torch_write}); is the file system full, over quota or failing?"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def guarded_write(path: str | os.PathLike, what: str, *, partial: str | os.PathLike | None = None) -> Iterator[None]:
    """Run the block that writes ``what`` to ``path``; a failed write (ENOSPC, EDQUOT, EIO, EACCES, torch's
    ``unexpected pos``) becomes a one-line :class:`WriteError` naming the path and the cause, and
    ``partial`` (the write's temporary file or directory, if any) is removed. Other errors pass unchanged.
    Write to a temporary path and rename it over ``path`` inside the block: the previous ``path`` (the last
    good checkpoint) then stays as it was."""
    try:
        yield
    except BaseException as e:
        cause = write_failure(e, path)
        if cause is None:
            raise
        if partial is not None:
            _remove(Path(partial))
        raise WriteError(f"{what} {path}: cannot write: {cause}") from e


_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_path(text: str) -> str:
    """``~`` / ``~user`` and ``$VAR`` / ``${VAR}`` expanded in a path: the one rule of every path key and option.

    A variable that is not set is a ValueError naming it (a path ``$SCRATCH/runs`` must not become a
    directory literally named ``$SCRATCH``).
    """
    def variable(m: re.Match) -> str:
        name = m.group(1).strip("{}")
        if name not in os.environ:
            raise ValueError(f"environment variable ${name} in {text!r} is not set")
        return os.environ[name]

    return os.path.expanduser(_VARIABLE.sub(variable, text))


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file or directory (after symlinks; hard links too, when both exist)."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
        return pa.resolve() == pb.resolve()
    except (OSError, RuntimeError):  # a symlink loop, an unreadable parent: not provably the same
        return False


def check_writable(path: str | os.PathLike, what: str, *, directory: bool = True, hint: str = "") -> None:
    """Refuse an output path before anything is computed or written; ``what`` names the key or option.

    A directory output must not be an existing file (a file output not an existing directory), and the
    nearest existing ancestor must take new entries: probed by creating and removing a temporary file
    there, so permission bits, read-only mounts and root-squashed shares all count.
    """
    p = Path(path)
    if directory and p.exists() and not p.is_dir():
        raise ConfigError(f"{what}: {p} is a file, not a directory{hint}")
    if not directory and p.is_dir():
        raise ConfigError(f"{what}: {p} is a directory, not a file{hint}")
    ancestor = p if directory and p.is_dir() else p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{what}: {p} cannot be created: {ancestor} is a file, not a directory{hint}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".rao_write_probe_", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{what}: {p} is not writable: cannot create files in {ancestor} "
                          f"({e.strerror or type(e).__name__}){hint}") from None
