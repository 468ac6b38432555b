"""Megatron's distributed optimizer on CPU gloo workers: checkpoint resume (same and other layouts), bf16.

The trainer uses the distributed optimizer on GPU only; these tests force it on CPU so its checkpoint
path (``save_training_checkpoint`` / ``load_training_checkpoint``) and its bf16 path (bf16 parameters,
fp32 master weights) are exercised without a GPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from transformers import AutoModelForCausalLM

from rao_megatron.conversion import load_hf_state_dict_into_megatron, megatron_to_hf_state_dict
from rao_megatron.models import as_chunks, build_gpt_model, tiny_hf_config
from rao_megatron.parallel.launch import run_distributed
from rao_megatron.parallel.state import destroy_model_parallel, initialize_model_parallel
from rao_megatron.training.checkpoint import load_training_checkpoint, save_training_checkpoint

pytestmark = pytest.mark.distributed

SEQ, GLOBAL_BATCH, MICRO_BATCH = 16, 4, 2
LR = 1e-3


def _hf_config() -> Any:
    return tiny_hf_config("llama")


def _initial_hf_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_hf_config()).float().state_dict()


def _batch(step: int, vocab: int) -> torch.Tensor:
    """The global batch of step ``step``: the same on every rank and in every run."""
    return torch.randint(3, vocab, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(100 + step))


def _build(tp: int, dist_opt: bool, bf16: bool) -> tuple[Any, Any]:
    """DDP-wrapped tiny Llama (this rank's TP shard of the seeded HF weights) + Megatron Adam."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    initialize_model_parallel(tp=tp)
    cfg = _hf_config()
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = build_gpt_model(cfg, params_dtype=dtype)
    load_hf_state_dict_into_megatron(model, _initial_hf_state(), cfg)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=dist_opt), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=LR, weight_decay=0.01, bf16=bf16, fp16=False, params_dtype=dtype, clip_grad=1.0,
        use_distributed_optimizer=dist_opt), [ddp])
    return ddp, opt


def _train_step(ddp: Any, opt: Any, step: int, grads: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """One optimizer step on ``_batch(step)`` split over DP ranks; returns the global mean loss.

    ``grads`` (one rank only): filled with the gradient of every parameter, as reduced, before the update.
    """
    vocab = _hf_config().vocab_size
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    micro = list(_batch(step, vocab).split(MICRO_BATCH))[dp_rank::dp]

    def forward(data_iterator: Any, m: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        t = next(data_iterator)
        logits = m(t[:, :-1], torch.arange(SEQ).expand(t.shape[0], -1), None)

        def loss(o: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            value = vocab_parallel_cross_entropy(o.float().clone(), t[:, 1:]).mean()
            return value, {"loss": value.detach().clone()}  # the schedule divides value in place

        return logits, loss

    ddp.zero_grad_buffer()
    opt.zero_grad()
    out = get_forward_backward_func()(forward_step_func=forward, data_iterator=iter(micro), model=[ddp],
                                      num_microbatches=len(micro), seq_length=SEQ,
                                      micro_batch_size=MICRO_BATCH, forward_only=False)
    loss = torch.stack([o["loss"] for o in out]).mean().double()
    dist.all_reduce(loss, group=ps.get_data_parallel_group())
    if grads is not None:
        assert dist.get_world_size() == 1
        grads.update({n: p.main_grad.detach().float().clone() for n, p in ddp.module.named_parameters()})
    ok, grad_norm, _ = opt.step()
    assert ok
    return {"loss": loss.item() / dp, "grad_norm": grad_norm}


def _resume_worker(tp: int, bf16: bool, steps: list[int], load_dir: str | None, save_root: str | None,
                   out: str, dist_opt: bool = True) -> None:
    """Train ``steps`` (distributed optimizer by default), resuming from ``load_dir`` / saving at the end."""
    ddp, opt = _build(tp, dist_opt=dist_opt, bf16=bf16)
    if load_dir is not None:
        state = load_training_checkpoint(load_dir, [ddp], opt)
        assert state["step"] == steps[0]
    records = [_train_step(ddp, opt, s) for s in steps]
    if save_root is not None:
        save_training_checkpoint(save_root, steps[-1] + 1, [ddp], opt, {"step": steps[-1] + 1},
                                 {"task": "policy", "hf_config": _hf_config().to_dict()}, keep_last=1)
    weights = megatron_to_hf_state_dict(as_chunks(ddp), _hf_config())
    if dist.get_rank() == 0:
        torch.save({"records": records, "weights": weights}, out)
    destroy_model_parallel()


@pytest.fixture(scope="module")
def dp2_runs(tmp_path_factory) -> Any:
    """``dp2_runs(bf16)``: DP2 distributed optimizer, 4 uninterrupted steps and 2 steps + checkpoint (once each)."""
    made: dict[bool, dict[str, Any]] = {}

    def runs(bf16: bool) -> dict[str, Any]:
        if bf16 not in made:
            d = tmp_path_factory.mktemp("bf16" if bf16 else "fp32")
            run_distributed(_resume_worker, 2, 1, bf16, [0, 1, 2, 3], None, None, str(d / "full.pt"))
            run_distributed(_resume_worker, 2, 1, bf16, [0, 1], None, str(d / "ckpt"), str(d / "first.pt"))
            made[bf16] = {"ckpt": d / "ckpt" / "step_0000002", "full": torch.load(d / "full.pt"),
                          "first": torch.load(d / "first.pt")}
        return made[bf16]

    return runs


def _losses(run: dict[str, Any]) -> list[float]:
    return [r["loss"] for r in run["records"]]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_dp2_distributed_optimizer_resume_is_exact(dp2_runs, tmp_path, bf16) -> None:
    runs = dp2_runs(bf16)
    full = runs["full"]
    assert _losses(runs["first"]) == _losses(full)[:2]
    # the memory-efficient, fully reshardable layout was written (and is what the loader reads back)
    assert dist_checkpointing.load_content_metadata(str(runs["ckpt"])) == {
        "distrib_optim_sharding_type": "fully_reshardable", "distrib_optim_fully_reshardable_mem_efficient": True}
    run_distributed(_resume_worker, 2, 1, bf16, [2, 3], str(runs["ckpt"]), None, str(tmp_path / "resumed.pt"))
    resumed = torch.load(tmp_path / "resumed.pt")
    # same layout, same computation: bit-identical losses and weights (the step after the resume needs the
    # restored Adam moments and step count; the weights alone would not give the same second loss)
    assert _losses(resumed) == _losses(full)[2:]
    for key, w in full["weights"].items():
        assert torch.equal(resumed["weights"][key], w), key


@pytest.mark.parametrize("world,tp", [(1, 1), (2, 2)], ids=["dp1", "tp2"])
def test_dp2_distributed_optimizer_checkpoint_resumes_at_other_layout(dp2_runs, tmp_path, world, tp) -> None:
    runs = dp2_runs(False)
    full = runs["full"]
    run_distributed(_resume_worker, world, tp, False, [2, 3], str(runs["ckpt"]), None, str(tmp_path / "r.pt"))
    resumed = torch.load(tmp_path / "r.pt")
    # Another layout sums the same fp32 numbers in another order: equal to fp32 rounding, not bit-identical.
    # The first resumed loss comes from the loaded weights alone; after that, Adam's ~lr*sign(g) step may flip
    # elements whose gradient is rounding noise (any CPU may do it), so later losses and the weights get a
    # bound such flips respect: at most 2*lr per element per step, and only on a few elements.
    first, *later = zip(_losses(resumed), _losses(full)[2:])
    assert first[0] == pytest.approx(first[1], rel=1e-6, abs=0)
    for got, want in later:
        assert got == pytest.approx(want, rel=1e-4, abs=0)
    for key, w in full["weights"].items():
        diff = (resumed["weights"][key] - w).abs()
        assert diff.max().item() <= 2 * LR * 2, f"{key} differs by {diff.max().item():.2e}"
        assert (diff > 1e-2 * LR).float().mean().item() <= 0.01, f"{key}: too many elements moved apart"


def test_distributed_optimizer_checkpoint_is_refused_by_the_plain_optimizer(dp2_runs, tmp_path) -> None:
    # the two keep their state under different keys: a clear error, not a missing-key error deep in torch
    with pytest.raises(Exception, match="holds the state of the distributed optimizer, but this run uses the plain"):
        run_distributed(_resume_worker, 1, 1, False, [2], str(dp2_runs(False)["ckpt"]), None,
                        str(tmp_path / "r.pt"), False)


# --------------------------------------------------------------------------------------------------
# bf16 parameters with fp32 master weights
# --------------------------------------------------------------------------------------------------


def _master_weights(ddp: Any, opt: Any) -> dict[str, torch.Tensor]:
    """The optimizer's fp32 copy of every parameter (whole tensors, on every rank), by Megatron name."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    inner = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
    names = {p: n for n, p in ddp.module.named_parameters()}
    if isinstance(inner, DistributedOptimizer):
        state = inner.get_parameter_state_dp_zero(use_gloo_comm=True, return_on_all_ranks=True)
        out = {}
        for gbuf_idx, buffer in enumerate(inner.buffers):
            (world,) = state[gbuf_idx].values()
            for p, (start, end, _) in buffer.param_index_map.items():
                out[names[p]] = world["param"][start:end].view(p.shape).clone()
        return out
    out = {n: p.detach().float().clone() for p, n in names.items()}  # fp32 parameters are their own master
    if isinstance(inner, Float16OptimizerWithFloat16Params):
        out.update({names[p]: m.detach().clone()
                    for group, masters in zip(inner.float16_groups, inner.fp32_from_float16_groups)
                    for p, m in zip(group, masters)})
    return out


def _bf16_worker(bf16: bool, dist_opt: bool, steps: int, out: str) -> None:
    """Train ``steps`` at TP1 (fp32 or bf16 parameters); record the fp32 masters before, after step 0 and at
    the end, and (on one rank) the gradient of step 0."""
    ddp, opt = _build(1, dist_opt=dist_opt, bf16=bf16)
    # the masters before step 0 are fp32 copies of the (bf16-rounded) parameters
    initial = {n: p.detach().float().clone() for n, p in ddp.module.named_parameters()}
    first_grads: dict[str, torch.Tensor] | None = {} if dist.get_world_size() == 1 else None
    records = [_train_step(ddp, opt, 0, first_grads)]
    after_first = _master_weights(ddp, opt)
    records += [_train_step(ddp, opt, s) for s in range(1, steps)]
    final = _master_weights(ddp, opt)
    if dist.get_rank() == 0:
        torch.save({"records": records, "initial": initial, "after_first": after_first, "final": final,
                    "first_grads": first_grads}, out)
    destroy_model_parallel()


@pytest.fixture(scope="module")
def fp32_tp1_run(tmp_path_factory) -> dict[str, Any]:
    """The reference: fp32 parameters, plain Adam, one rank."""
    out = tmp_path_factory.mktemp("fp32_tp1") / "run.pt"
    run_distributed(_bf16_worker, 1, False, False, 3, str(out))
    return torch.load(out)


@pytest.mark.parametrize("dist_opt", [True, False], ids=["distributed_optimizer", "float16_optimizer"])
def test_bf16_params_with_fp32_master_weights_at_dp2_match_fp32(fp32_tp1_run, tmp_path, dist_opt) -> None:
    """bf16 parameters (fp32 master weights, fp32 grad reduction) at DP2 track the fp32 run within bf16 precision.

    bf16 keeps 8 significant bits: rounding a value costs at most 2^-8 of it (half an ulp of the binade's
    lower end). The masters start at the bf16-rounded weights (|m0 - w0| <= 2^-8 |w0|); everything after
    that is fp32 arithmetic on gradients from a bf16 forward/backward, whose error here is a few % of the
    tensor's gradient RMS (8 % at most measured; it is relative to the gradient scale, not to each element).
    """
    ref = fp32_tp1_run
    run_distributed(_bf16_worker, 2, True, dist_opt, 3, str(tmp_path / "bf16.pt"))
    got = torch.load(tmp_path / "bf16.pt")
    bf16_rel = 2.0 ** -8
    # the loss is a mean over 64 tokens of a log-softmax: its bf16 error averages out far below one unit
    for a, b in zip(_losses(got), _losses(ref)):
        assert a == pytest.approx(b, rel=bf16_rel, abs=0)
    checked_bf16 = 0
    for key, w_final in ref["final"].items():
        w0, g = ref["initial"][key], ref["first_grads"][key]
        m0 = got["initial"][key]
        assert got["final"][key].dtype == torch.float32, key  # the optimizer holds fp32 masters
        assert ((m0 - w0).abs() <= bf16_rel * w0.abs()).all(), key
        # Step 0 is Adam's first step, -lr * g / |g| (+ weight decay): the update's sign is the gradient's.
        # Compare it only where the gradient is well above the bf16 gradient noise (> 1/4 of its RMS, >= 3x
        # the worst error measured); there the fp32 master moves exactly as the fp32 weight does.
        # (A weight kept only in bf16 rounds that move to its ulp: up to 0.25 lr off for these |w| < 0.125.)
        strong = g.abs() > 0.25 * g.pow(2).mean().sqrt()
        assert strong.float().mean() > 0.15, key
        step0 = got["after_first"][key] - m0
        step0_ref = ref["after_first"][key] - w0
        assert torch.equal(torch.sign(step0[strong]), torch.sign(step0_ref[strong])), key
        assert (step0 - step0_ref)[strong].abs().max() <= 1e-3 * LR, key
        # After 3 steps: within the initial rounding plus a fraction of one update where the gradient is
        # strong; elsewhere (near-zero gradients) Adam's normalised steps of ~lr may go either way.
        drift = (got["final"][key] - w_final).abs() - bf16_rel * w0.abs()
        assert drift[strong].max() <= 0.5 * LR, f"{key}: {drift[strong].max() / LR:.2f} lr"
        assert drift.max() <= 6 * LR, key
        assert (drift > 0.5 * LR).float().mean() <= 0.01, key
        checked_bf16 += int((m0 != w0).any())
    assert checked_bf16 >= 10  # the weight matrices really were bf16 (the torch norms keep fp32 weights)
