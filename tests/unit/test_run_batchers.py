"""The batchers and log-prob settings built from the config (``run_data.build_batchers`` / ``group_batcher`` /
``logprob_settings``): the trainer's held-out pass and ``precompute_reference``'s pass over the same file run
the same micro-batches; and the one pad-id rule (``data.tokenizer.pad_id``)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from rao_megatron.config import ConfigError, load_config
from rao_megatron.data import TokenizedGroup, load_tokenizer
from rao_megatron.data.tokenizer import pad_id
from rao_megatron.training import reference, run_data

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples/configs/rao_tiny.yaml"
DP = 2


def _groups(n: int, first_row: int = 0) -> list[TokenizedGroup]:
    """Groups of 2-3 responses of 5-59 tokens (so the two DP ranks' shares pack into different counts)."""
    out = []
    for i in range(n):
        row = first_row + i
        sizes = [10 + (row * 13) % 50, 5 + (row * 7) % 40] + ([45] if row % 3 == 0 else [])
        out.append(TokenizedGroup(group_id=row, prompt_ids=[1, 5 + row % 200, 9], rewards=[float(s) for s in sizes],
                                  responses=[[7 + j] * s for j, s in enumerate(sizes)], is_reference=None, row=row))
    return out


def _run_groups() -> run_data.RunGroups:
    return run_data.RunGroups(train=_groups(13), heldout=_groups(9, first_row=100), report=None,
                              heldout_report=None, t0=None)


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and not (x.shape == y.shape and torch.equal(x, y)):
            return False
        if not isinstance(x, torch.Tensor) and x != y:
            return False
    return True


def _arch(tokenizer, cfg) -> types.SimpleNamespace:
    """What the batchers read of the model's architecture (its vocabulary for the kernel, MoE or not, hidden
    size), the same for the trainer's batchers and precompute's."""
    return types.SimpleNamespace(vocab_size=len(tokenizer), moe=object() if cfg.parallel.ep > 1 else None,
                                 hidden_size=64)


def _precompute(monkeypatch: pytest.MonkeyPatch, cfg, tokenizer, groups: list, rank: int) -> tuple[list, dict]:
    """The micro-batches ``reference.compute_file_cache`` runs on DP rank ``rank`` (forward stubbed out, one
    process), and what it writes."""
    from megatron.core import parallel_state as ps

    seen: list[dict] = []
    written: dict = {}

    def sequence_logps(chunks, microbatches, *, vocab_size, settings):
        assert settings == run_data.logprob_settings(cfg)
        seen.extend(microbatches)
        return [(torch.zeros(len(mb["group_ids"])), torch.ones(len(mb["group_ids"]))) for mb in microbatches]

    monkeypatch.setattr(ps, "get_data_parallel_world_size", lambda *a, **k: DP)
    monkeypatch.setattr(ps, "get_data_parallel_rank", lambda *a, **k: rank)
    monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda *a, **k: 0)
    monkeypatch.setattr(reference, "is_last_stage", lambda: True)
    monkeypatch.setattr(reference, "is_rank0", lambda: True)
    monkeypatch.setattr(reference, "sequence_logps", sequence_logps)
    monkeypatch.setattr(reference, "dist", types.SimpleNamespace(
        get_world_size=lambda: 1, barrier=lambda: None,
        all_gather_object=lambda parts, obj: parts.__setitem__(0, obj)))
    monkeypatch.setattr(reference, "write_cache", lambda path, keys, *rest: written.update(keys=keys))
    reference.compute_file_cache(cfg, tokenizer, None, _arch(tokenizer, cfg), groups, "heldout.jsonl", "unused",
                                 identity=({}, {}))
    return seen, written


@pytest.mark.parametrize("overrides", [
    [],                                                               # packed (the default: shared prompts here)
    ["data.shared_prompt=false"],                                     # packed, one prompt per response
    ["data.packing=false"],                                           # one padded sequence per row
    ["data.micro_batch_tokens=192"],                                  # packed, three rows of 64
    ["model.preset=tiny-qwen3-moe", "parallel.ep=2"],                 # expert parallelism: equal counts
], ids=["packed", "unshared", "padded", "micro_batch_tokens", "ep2"])
def test_precompute_runs_the_trainers_held_out_batches(monkeypatch, overrides):
    cfg = load_config(CONFIG, overrides)
    tok = load_tokenizer(None)
    groups = _run_groups()
    counts = []
    for rank in range(DP):
        train, heldout = run_data.build_batchers(cfg, groups, pad_id=pad_id(tok), dp_rank=rank, dp_size=DP,
                                                 arch=_arch(tok, cfg))
        assert train.global_batch_groups == cfg.train.global_batch_groups and len(train.groups) == 13
        assert heldout.global_batch_groups == DP * cfg.data.groups_per_micro_batch
        assert heldout.equal_micro_batches == ("parallel.ep=2" in overrides)
        seen, written = _precompute(monkeypatch, cfg, tok, groups.heldout, rank)
        expected = list(heldout.iter_eval_microbatches())
        assert len(seen) == len(expected) and all(_same(a, b) for a, b in zip(seen, expected))
        assert sorted(written["keys"]) == sorted(k for mb in expected for k in mb["seq_keys"][mb["group_ids"] >= 0])
        counts.append(len(seen))
    if "parallel.ep=2" in overrides:
        assert counts[0] == counts[1]
    elif overrides == ["data.shared_prompt=false"]:
        assert counts[0] != counts[1]  # the data does deal the ranks different packed counts


def test_without_held_out_groups_there_is_no_held_out_batcher():
    cfg = load_config(CONFIG, [])
    groups = _run_groups()
    groups.heldout = []
    train, heldout = run_data.build_batchers(cfg, groups, pad_id=0, dp_rank=0, dp_size=1)
    assert heldout is None and train.rows_per_group == 3


def test_a_batcher_the_config_cannot_build_is_a_config_error():
    groups = _run_groups()
    cfg = load_config(CONFIG, ["data.packing=false", "train.global_batch_groups=6"])  # 6 groups over 2 × 2
    with pytest.raises(ConfigError, match="config keys 'train.global_batch_groups' / 'data.groups_per_micro_batch'"):
        run_data.build_batchers(cfg, groups, pad_id=0, dp_rank=0, dp_size=2)
    big = TokenizedGroup(group_id=7, prompt_ids=[1, 2], responses=[[3] * 30] * 3, rewards=[1.0, 0.0, 0.5],
                         is_reference=None, row=7)
    cfg = load_config(CONFIG, ["data.micro_batch_tokens=64"])  # one row of 64 tokens: 3 × 32 cannot fit
    only_big = run_data.RunGroups(train=[big], heldout=[], report=None, heldout_report=None, t0=None)
    with pytest.raises(ConfigError, match=rf"^{cfg.data.train_path}: row 7: .*raise data.micro_batch_tokens"):
        run_data.build_batchers(cfg, only_big, pad_id=0, dp_rank=0, dp_size=1)
    with pytest.raises(ConfigError, match=r"^heldout.jsonl: row 7: "):
        run_data.group_batcher(cfg, [big], source="heldout.jsonl", pad_id=0, dp_rank=0, dp_size=1)


def test_logprob_settings_come_from_the_model_section():
    s = run_data.logprob_settings(load_config(CONFIG, ["model.logprob_impl=reference", "model.logprob_chunk_size=64"]))
    assert (s.impl, s.precision, s.chunk_size) == ("reference", "fp32", 64)


def test_pad_id_is_the_pad_token_else_eos_else_the_default():
    tok = load_tokenizer(None)
    assert pad_id(tok) == tok.pad_token_id == tok.convert_tokens_to_ids("<|pad|>")
    assert pad_id(types.SimpleNamespace(pad_token_id=0)) == 0  # a pad id of 0 is a pad id
    assert pad_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=5), default=0) == 5
    assert pad_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=None), default=0) == 0
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        pad_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=None))
