"""The settings a CUDA run gets, pinned on the CPU by simulating the device (issue #25).

- fused kernels: which ``TransformerConfig`` fusions are on with Transformer Engine on CUDA, all off on the CPU;
- Megatron DDP: gradient reduce-scatter / parameter all-gather overlapped with compute on CUDA, and the
  schedule hooks Megatron-LM sets with them; run for real over gloo with the CUDA settings forced;
- packed batches on CUDA need bf16 (TE's THD attention), and the reward scorer pads an fp32 model there;
- sequence parallelism needs each micro-batch's token count divisible by TP.

"Simulating CUDA" means pinning ``compute_device()`` to ``cuda`` (nothing is allocated there) or
replacing the one function that asks; no test here runs a CUDA kernel or imports Transformer Engine.
"""

from __future__ import annotations

import contextlib
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from rao_megatron.config import ConfigError, load_config
from rao_megatron.models import hf_config, tiny_hf_config, transformer_config_from_hf
from rao_megatron.parallel import device, startup
from rao_megatron.parallel.device import force_compute_device
from rao_megatron.parallel.launch import run_distributed
from rao_megatron.training import engine

TINY = "examples/configs/rao_tiny.yaml"
FUSIONS = ("apply_rope_fusion", "gradient_accumulation_fusion", "bias_activation_fusion", "bias_dropout_fusion",
           "masked_softmax_fusion", "persist_layer_norm")


@contextlib.contextmanager
def compute_device(device: str):
    """``compute_device()`` answers ``device`` inside the block (no tensor is put there)."""
    force_compute_device(device)
    try:
        yield
    finally:
        force_compute_device(None)


# ---------------------------------------------------------------- A: fused kernels


def test_transformer_engine_on_cuda_needs_both(monkeypatch):
    """The one rule behind the TE layer spec, the fused kernels and THD attention for packed batches."""
    import importlib.util

    real = importlib.util.find_spec
    for where, te, expected in (("cuda", True, True), ("cuda", False, False), ("cpu", True, False)):
        spec = object() if te else None
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, spec=spec: spec if name == "transformer_engine" else real(name, *a))
        with compute_device(where):
            assert device.transformer_engine_on_cuda() is expected, (where, te)


def test_every_fusion_is_off_on_the_cpu():
    config = transformer_config_from_hf(tiny_hf_config("llama"))
    assert {name: getattr(config, name) for name in FUSIONS} == dict.fromkeys(FUSIONS, False)


def _simulate_te_on_cuda(monkeypatch, apex: bool) -> None:
    """TE on CUDA as ``transformer_config_from_hf`` sees it, and TE's fused RoPE as ``TransformerConfig``
    checks it (a stand-in function: ``__post_init__`` only asks that it exists)."""
    from megatron.core.models.common.embeddings import rope_utils

    monkeypatch.setattr(device, "transformer_engine_installed", lambda: True)
    monkeypatch.setattr(hf_config, "_apex_wgrad_fusion_installed", lambda: apex)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb_thd", lambda *a, **k: None)


@pytest.mark.parametrize("apex", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_fusions_on_cuda_with_transformer_engine(monkeypatch, family, apex):
    _simulate_te_on_cuda(monkeypatch, apex)
    with compute_device("cuda"):  # TransformerConfig's own checks run (and accept the combination)
        config = transformer_config_from_hf(tiny_hf_config(family), params_dtype=torch.bfloat16)
    assert {name: getattr(config, name) for name in FUSIONS} == {
        "apply_rope_fusion": True,  # unfused THD RoPE splits by cu_seqlens on the host, per layer
        "gradient_accumulation_fusion": apex,  # Megatron's output ColumnParallelLinear needs apex's kernel
        "bias_activation_fusion": True,  # SwiGLU without bias
        "bias_dropout_fusion": True,
        "masked_softmax_fusion": False,  # the local attention's kernel: TE attention ignores it
        "persist_layer_norm": False,  # apex FusedLayerNorm only: TE norms ignore it, torch norms refuse it
    }


def test_fused_false_keeps_the_kernels_off_on_cuda(monkeypatch):
    """A model built with the local spec on CUDA (``fused=False``) gets none of them; overrides win last."""
    _simulate_te_on_cuda(monkeypatch, apex=True)
    with compute_device("cuda"):
        off = transformer_config_from_hf(tiny_hf_config("llama"), fused=False)
        override = transformer_config_from_hf(tiny_hf_config("llama"), bias_dropout_fusion=False)
    assert not any(getattr(off, name) for name in FUSIONS)
    assert override.apply_rope_fusion and not override.bias_dropout_fusion


class _Built(Exception):
    pass


@pytest.mark.parametrize("use_te", [False, True])
def test_a_model_gets_the_fused_kernels_with_the_te_spec_only(monkeypatch, use_te):
    """``build_gpt_model(use_te=False)`` on a CUDA machine with TE builds the local spec: no TE fusions for it."""
    from megatron.core import parallel_state as ps

    from rao_megatron.models import provider

    for name in ("get_tensor_model_parallel_world_size", "get_pipeline_model_parallel_world_size",
                 "get_expert_model_parallel_world_size", "get_expert_tensor_parallel_world_size"):
        monkeypatch.setattr(ps, name, lambda *a, **k: 1)
    monkeypatch.setattr(ps, "get_virtual_pipeline_model_parallel_world_size", lambda *a, **k: None)
    seen: dict[str, Any] = {}

    def config_from_hf(cfg: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        raise _Built

    monkeypatch.setattr(provider, "transformer_config_from_hf", config_from_hf)
    monkeypatch.setattr(device, "transformer_engine_installed", lambda: True)
    with compute_device("cuda"), pytest.raises(_Built):
        provider.build_gpt_model(tiny_hf_config("llama"), use_te=use_te)
    assert seen["fused"] is use_te


# ---------------------------------------------------------------- B: DDP


def test_ddp_overlaps_communication_on_cuda_only():
    with compute_device("cuda"):
        plain, dist_opt, interleaved = (engine.ddp_config(False), engine.ddp_config(True),
                                        engine.ddp_config(True, interleaved=True))
    cpu = engine.ddp_config(True, interleaved=True)

    def fields(c: Any) -> tuple:
        return (c.overlap_grad_reduce, c.overlap_param_gather, c.align_param_gather, c.use_distributed_optimizer)

    assert fields(plain) == (True, False, False, False)  # all-reduce overlapped; no shards to gather
    assert fields(dist_opt) == (True, True, False, True)  # reduce-scatter and all-gather overlapped
    assert fields(interleaved) == (True, True, True, True)  # all-gathers aligned across pipeline stages
    assert fields(cpu) == (False, False, False, True)  # gloo: one synchronous reduction, as before
    for c in (plain, dist_opt, interleaved, cpu):
        assert c.grad_reduce_in_fp32 and c.bucket_size is None  # None: Megatron's max(40M, 1M x DP) elements


class _Chunk(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.built_with_te = False


def test_empty_micro_batches_run_first_and_outputs_keep_the_callers_order(monkeypatch):
    """Training: the schedule sees the empty (all-padding) micro-batches first, so the last one, whose
    gradients decide when DDP launches each bucket's overlapped reduction, reaches every weight."""
    seen: list[int] = []

    def schedule(*, forward_step_func: Any, data_iterator: Any, forward_only: bool, **_: Any) -> list[dict]:
        order = [int(mb["tag"]) for mb in data_iterator]
        seen[:] = order
        return [{"tag": t} for t in order]

    monkeypatch.setattr(engine, "get_forward_backward_func", lambda: schedule)

    def mb(tag: int, sequences: int) -> dict[str, torch.Tensor]:
        return {"tokens": torch.zeros(2, 4, dtype=torch.long), "tag": torch.tensor(tag),
                "group_ids": torch.zeros(sequences, dtype=torch.long)}

    batches = [mb(0, 3), mb(1, 2), mb(2, 0), mb(3, 0)]
    out = engine.forward_backward([_Chunk()], object(), batches)
    assert seen == [2, 3, 0, 1]
    assert [int(o["tag"]) for o in out] == [0, 1, 2, 3]
    engine.forward_backward([_Chunk()], object(), batches, forward_only=True)
    assert seen == [0, 1, 2, 3]  # forward only: as given


def _cuda_ddp_settings(bucket_size: int | None = None) -> None:
    """In a CPU worker: DDP gets the CUDA settings (overlap on), the model stays on the CPU. ``bucket_size``:
    small buckets, so that a tiny model spans several and the bucket-by-bucket launches are exercised."""
    real = engine.ddp_config

    def on_cuda(*args: Any, **kwargs: Any) -> Any:
        with compute_device("cuda"):
            settings = real(*args, **kwargs)
        settings.bucket_size = bucket_size
        return settings

    engine.ddp_config = on_cuda


def _flat_params(chunks: list[torch.nn.Module]) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for c in chunks for p in c.module.parameters()])


def _train_worker(tmp: str, overlap: bool, bucket_size: int | None, out: str, resume: str | None = None) -> None:
    """DP 2, distributed optimizer: two steps with an all-padding micro-batch last, then a checkpoint; or, with
    ``resume``, that checkpoint's third step."""
    import torch.distributed as dist

    from rao_megatron.data.packing import empty_packed
    from rao_megatron.models.checkpoint import load_model_checkpoint
    from rao_megatron.training.loop import Trainer

    if overlap:
        _cuda_ddp_settings(bucket_size)
    steps = ["train.steps=2"] if resume is None else ["train.steps=3", f"checkpoint.resume={resume}"]
    trainer = Trainer(load_config(TINY, [f"train.output_dir={tmp}", f"data.token_cache={tmp}/tokens", *steps,
                                         "train.reference=on_the_fly", "parallel.distributed_optimizer=true",
                                         "parallel.device=cpu", "parallel.backend=gloo"]))
    chunk = trainer.chunks[0]
    assert chunk.ddp_config.overlap_grad_reduce is overlap and chunk.ddp_config.overlap_param_gather is overlap
    assert trainer.optimizer.config.overlap_param_gather is overlap
    cfg = chunk.config
    assert cfg.grad_sync_func == (chunk.start_grad_sync if overlap else None)
    assert cfg.no_sync_func == chunk.no_sync and cfg.param_sync_func is None  # no VPP: pre-hooks gather
    assert (len(chunk.bucket_groups) > 1) is (bucket_size is not None)
    batcher = trainer.train_batcher
    real_next = batcher.next_step
    # what a DP rank runs under expert parallelism when its share packs into fewer micro-batches
    padding = empty_packed(batcher.rows, batcher.row_tokens, 0, seq_keys=[], rewards=[])
    batcher.next_step = lambda: real_next() + [dict(padding)]
    if resume is not None:
        record = trainer.train_step()
        engine.sync_params(trainer.chunks)
        if dist.get_rank() == 0:
            torch.save({"losses": [record["loss"]], "params": _flat_params(trainer.chunks)}, out)
        return
    records = [trainer.train_step() for _ in range(2)]
    stale = _flat_params(trainer.chunks)
    path = trainer.save_checkpoint()
    saved = engine.build_model_chunks(trainer.arch, task="reference")
    load_model_checkpoint(saved, path)
    if dist.get_rank() == 0:
        torch.save({"losses": [r["loss"] for r in records], "stale": stale, "synced": _flat_params(trainer.chunks),
                    "saved": torch.cat([p.detach().reshape(-1) for c in saved for p in c.parameters()])}, out)


@pytest.mark.distributed
def test_overlapped_ddp_trains_like_the_plain_one_and_checkpoints_current_weights(tmp_path):
    """The CUDA DDP settings over gloo: same losses and weights as without overlap, with an all-padding
    micro-batch last in every step; the checkpoint written right after an update holds the updated weights
    (the all-gather that would otherwise wait for the next forward runs first). Buckets: Megatron's default
    (the tiny model in one, with the untied output layer the padding does not reach) and small ones (ten,
    gathered one after another in the forward pass)."""
    runs = {}
    for name, overlap, bucket_size in (("plain", False, None), ("one_bucket", True, None), ("buckets", True, 4096)):
        out = tmp_path / f"{name}.pt"
        run_distributed(_train_worker, 2, str(tmp_path / name), overlap, bucket_size, str(out), timeout_s=300)
        runs[name] = torch.load(out)
    plain = runs["plain"]
    torch.testing.assert_close(plain["saved"], plain["synced"])
    for name in ("one_bucket", "buckets"):
        overlapped = runs[name]
        assert overlapped["losses"] == pytest.approx(plain["losses"], rel=1e-6, abs=1e-7), name
        torch.testing.assert_close(overlapped["synced"], plain["synced"])
        torch.testing.assert_close(overlapped["saved"], plain["saved"])
        # the all-gather really is deferred: before the sync, DP rank 0 held the other rank's half un-updated
        assert not torch.equal(overlapped["stale"], overlapped["synced"]), name
    # checkpoints cross the bucket layouts both ways (the optimizer state is saved in parameter space)
    resumed = {}
    for name, overlap, bucket_size, source in (("plain_from_buckets", False, None, "buckets"),
                                               ("buckets_from_plain", True, 4096, "plain")):
        out = tmp_path / f"{name}.pt"
        run_distributed(_train_worker, 2, str(tmp_path / name), overlap, bucket_size, str(out),
                        str(tmp_path / source / "checkpoints"), timeout_s=300)
        resumed[name] = torch.load(out)
    a, b = resumed["plain_from_buckets"], resumed["buckets_from_plain"]
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-6, abs=1e-7)
    torch.testing.assert_close(a["params"], b["params"])
    assert not torch.equal(a["params"], plain["synced"])  # a third step was taken


def _interleaved_worker(tmp: str, overlap: bool, out: str) -> None:
    """PP 2 x 2 virtual stages (the tiny Llama with 4 layers), distributed optimizer: two steps, then a checkpoint."""
    import torch.distributed as dist

    from rao_megatron.training import model_init
    from rao_megatron.training.loop import Trainer

    real_tiny = hf_config.tiny_hf_config
    model_init.tiny_hf_config = lambda family, **kw: real_tiny(family, **{**kw, "num_hidden_layers": 4})
    if overlap:
        _cuda_ddp_settings()
    trainer = Trainer(load_config(TINY, [f"train.output_dir={tmp}", f"data.token_cache={tmp}/tokens",
                                         "train.steps=2", "parallel.pp=2", "parallel.vpp=2",
                                         "parallel.distributed_optimizer=true", "parallel.device=cpu",
                                         "parallel.backend=gloo"]))
    chunks = trainer.chunks
    cfg = chunks[0].config
    assert [c.ddp_config.align_param_gather for c in chunks] == [overlap, overlap]
    assert cfg.param_sync_func == ([c.start_param_sync for c in chunks] if overlap else None)
    assert cfg.grad_sync_func == ([c.start_grad_sync for c in chunks] if overlap else None)
    assert cfg.no_sync_func == [c.no_sync for c in chunks]
    # buckets for the first chunk of the first stage only, as Megatron-LM's get_model
    first_stage = dist.get_rank() == 0
    assert [c.bucket_size is not None for c in chunks] == [overlap and first_stage, False]
    losses = [trainer.train_step()["loss"] for _ in range(2)]
    trainer.save_checkpoint()
    torch.save({"losses": losses, "params": _flat_params(chunks)}, f"{out}.{dist.get_rank()}")


@pytest.mark.distributed
def test_interleaved_schedule_with_aligned_param_gathers_trains_like_the_plain_one(tmp_path):
    runs = {}
    for overlap in (False, True):
        out = tmp_path / f"overlap{int(overlap)}.pt"
        run_distributed(_interleaved_worker, 2, str(tmp_path / f"run{int(overlap)}"), overlap, str(out),
                        timeout_s=300)
        runs[overlap] = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for plain, overlapped in zip(runs[False], runs[True]):  # per pipeline stage
        assert overlapped["losses"] == pytest.approx(plain["losses"], rel=1e-6, abs=1e-7)
        torch.testing.assert_close(overlapped["params"], plain["params"])


# ---------------------------------------------------------------- C: packed batches need bf16 on CUDA


def test_fp32_packing_is_refused_on_cuda():
    config = load_config(TINY)  # fp32, packing on (the defaults)
    with pytest.raises(ConfigError) as e:
        startup.check_packing_dtype(config.data.packing, config.model.dtype, thd=True)
    assert "data.packing=true" in str(e.value) and "model.dtype=bf16" in str(e.value)
    assert "\n" not in str(e.value)
    startup.check_packing_dtype(True, "bf16", thd=True)
    startup.check_packing_dtype(False, "fp32", thd=True)


def test_fp32_packing_runs_on_the_cpu():
    startup.check_packing_dtype(True, "fp32", thd=False)


def test_packing_dtype_asks_the_device_rule(monkeypatch):
    monkeypatch.setattr(startup, "transformer_engine_on_cuda", lambda: True)
    with pytest.raises(ConfigError):
        startup.check_packing_dtype(True, "fp32")
    monkeypatch.setattr(startup, "transformer_engine_on_cuda", lambda: False)
    startup.check_packing_dtype(True, "fp32")


@pytest.mark.parametrize("dtype,thd,packs", [("fp32", True, False), ("bf16", True, True), ("fp32", False, True)])
def test_reward_scorer_pads_an_fp32_model_that_would_run_thd(monkeypatch, tmp_path, dtype, thd, packs):
    """An fp32 reward model on CUDA with TE scores padded rows in fp32 (TE has no fp32 THD attention); bf16, or
    the CPU's local spec, keeps packing. The checkpoint, tokenizer and model are stand-ins."""
    from rao_megatron.models import checkpoint
    from rao_megatron.rewards import scorers
    from rao_megatron.training import model_init

    built: dict[str, Any] = {}

    def build_model_chunks(hf: Any, **kwargs: Any) -> list[torch.nn.Module]:
        built.update(kwargs)
        chunk = _Chunk()
        chunk.built_with_te = thd  # what uses_thd reads: built with the TE spec
        return [chunk]

    meta = {"task": "rm", "dtype": dtype, "hf_config": tiny_hf_config("llama").to_dict()}
    monkeypatch.setattr(scorers, "find_model_checkpoint", Path)
    monkeypatch.setattr(checkpoint, "read_checkpoint_meta", lambda path: meta)
    monkeypatch.setattr(checkpoint, "checkpoint_tokenizer", lambda path: "tok")
    monkeypatch.setattr(model_init, "load_weights", lambda chunks, path, arch, task: None)
    monkeypatch.setattr(checkpoint, "resolve_checkpoint", Path)
    monkeypatch.setattr(scorers, "load_tokenizer", lambda name: types.SimpleNamespace(pad_token_id=0))
    monkeypatch.setattr(engine, "build_model_chunks", build_model_chunks)
    scorer = scorers.ModelScorer(tmp_path)
    assert scorer.packing is packs
    assert built["params_dtype"] == (torch.float32 if dtype == "fp32" else torch.bfloat16)  # the trained dtype


# ---------------------------------------------------------------- D: sequence parallelism


@pytest.mark.parametrize("overrides,key", [
    (["data.packing=false", "data.max_length=63"], "data.max_length"),  # a padded row of 63 tokens
    (["data.max_length=63"], "data.max_length"),  # packed rows, as many as the data needs
    (["data.max_length=63", "data.micro_batch_tokens=189"], "data.micro_batch_tokens"),  # 3 rows of 63
])
def test_sequence_parallel_needs_tokens_divisible_by_tp(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["parallel.tp=2", "parallel.sequence_parallel=true", *overrides])
    message = str(e.value)
    assert f"config key '{key}'" in message and "parallel.tp=2" in message and "\n" not in message


@pytest.mark.parametrize("overrides", [
    ["data.max_length=64"],
    ["data.packing=false", "data.max_length=64"],
    ["data.max_length=63", "data.micro_batch_tokens=126"],  # 2 rows of 63: 126 tokens split in two
])
def test_sequence_parallel_accepts_divisible_token_counts(overrides):
    load_config(TINY, ["parallel.tp=2", "parallel.sequence_parallel=true", *overrides])
