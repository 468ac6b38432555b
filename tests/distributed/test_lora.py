"""LoRA at every layout: one training step's loss and adapter gradients at TP2, PP2, DP2 (Llama) and EP2,
expert-TP2 (Qwen3-MoE) equal TP1's, for policy losses, SFT, GRAO and the reward model (head + body LoRA);
the base receives no gradient. The adapters start from seeded non-zero values (a fresh B = 0 would make
A's gradient zero at every layout, and every check pass trivially)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rao_megatron.parallel.launch import run_distributed

from .engine_cases import synthetic_groups, tiny_model, train_step_loss
from .qwen3_cases import LOSSES, model_and_state, with_reference_answers

pytestmark = pytest.mark.distributed

RANK, ALPHA = 4, 8.0


def run_lora_step(tp: int, pp: int, ep: int, etp: int | None, losses: list[str], hf_cfg: Any,
                  hf_sd: dict[str, torch.Tensor], groups: list[dict[str, Any]], out_path: str) -> None:
    """Worker: for each loss, one forward/backward of a LoRA model at this layout; rank 0 saves the loss, the
    whole adapter gradients of every rank (and the reward head's), and whether any base weight got a gradient."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from rao_megatron.models import lora
    from rao_megatron.models.hf_state import load_hf_state_dict_into_megatron
    from rao_megatron.models.provider import as_chunks
    from rao_megatron.parallel.state import initialize_model_parallel
    from rao_megatron.training.engine import build_model_chunks

    from .engine_cases import microbatches

    initialize_model_parallel(tp=tp, pp=pp, ep=ep, etp=etp)
    mbs = with_reference_answers(microbatches(groups, 2))
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = mbs[dp_rank::dp]
    spec = lora.LoraSpec(rank=RANK, alpha=ALPHA)
    results = {}
    for loss in losses:
        task = "rm" if loss == "bt" else "policy"
        chunks = build_model_chunks(hf_cfg, task=task, lora=spec)
        load_hf_state_dict_into_megatron(chunks, hf_sd, hf_cfg)
        lora.set_full_adapter_tensors(chunks, lora.random_full_adapters(chunks))
        value = train_step_loss(chunks, loss, LOSSES[loss], mine, hf_cfg.vocab_size)
        grads = {f"{n}.{w}": g for n, pair in lora.full_adapter_tensors(chunks, of="main_grad").items()
                 for w, g in zip("AB", pair)}
        trained = {n for c in as_chunks(chunks) for n, p in c.named_parameters() if p.requires_grad}
        base_trained = sorted(n for n in trained if ".lora." not in n)
        for c in as_chunks(chunks):
            head = getattr(c, "output_layer", None)
            if task == "rm" and head is not None and c.post_process:
                grads["head"] = head.weight.main_grad.detach().clone()
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (grads, base_trained))
        merged: dict[str, torch.Tensor] = {}
        for g, _ in everyone:
            merged.update(g)
        results[loss] = {"loss": value, "grads": merged, "base_trained": sorted({n for _, b in everyone for n in b})}
    if dist.get_rank() == 0:
        torch.save(results, out_path)


def _run(tmp_path: Path, name: str, world: int, tp: int, pp: int, ep: int, etp: int | None, losses: list[str],
         cfg: Any, sd: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    out = tmp_path / f"{name}.pt"
    run_distributed(run_lora_step, world, tp, pp, ep, etp, losses, cfg, sd, groups, str(out))
    return torch.load(out, weights_only=False)


def assert_same_lora_step(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    """The same loss and adapter gradients, up to fp32 summation order (as ``engine_cases.assert_same_step``)."""
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), what
    assert a["grads"].keys() == b["grads"].keys(), what
    scale = max(g.abs().max().item() for g in a["grads"].values())
    assert scale > 0
    for key in a["grads"]:
        assert a["grads"][key].abs().max() > 0 or key == "head", f"{what}: {key} got no gradient"
        torch.testing.assert_close(a["grads"][key], b["grads"][key], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, key=key: f"{what}: gradient of {key}: {m}")


DENSE_LOSSES = ["rao", "dpo", "sft", "grao", "bt"]


@pytest.mark.slow
def test_lora_step_at_tp2_pp2_dp2_matches_tp1(tmp_path: Path) -> None:
    cfg, sd = tiny_model()
    groups = synthetic_groups(4, 3, seed=5)
    ref = _run(tmp_path, "tp1", 1, 1, 1, 1, None, DENSE_LOSSES, cfg, sd, groups)
    for loss in DENSE_LOSSES:
        assert ref[loss]["base_trained"] == (["output_layer.weight"] if loss == "bt" else []), loss
        # every target linear of both layers has an adapter with a gradient
        assert sum(k.endswith(".A") for k in ref[loss]["grads"]) == 2 * 4, loss
    for name, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}.items():
        got = _run(tmp_path, name, 2, tp, pp, 1, None, DENSE_LOSSES, cfg, sd, groups)
        for loss in DENSE_LOSSES:
            assert_same_lora_step(ref[loss], got[loss], f"{name} {loss}")


@pytest.mark.slow
def test_lora_step_with_experts_at_ep2_and_expert_tp2_matches_tp1(tmp_path: Path) -> None:
    cfg, sd = model_and_state("qwen3_moe")
    groups = synthetic_groups(4, 3, seed=6)
    losses = ["rao", "sft"]
    ref = _run(tmp_path, "moe_tp1", 1, 1, 1, 1, None, losses, cfg, sd, groups)
    experts = [k for k in ref["rao"]["grads"] if ".experts." in k]
    assert len(experts) == cfg.num_hidden_layers * cfg.num_experts * 2 * 2  # fc1 and fc2, A and B
    for name, (ep, etp) in {"ep2": (2, 1), "etp2": (1, 2)}.items():
        got = _run(tmp_path, name, 2, 1, 1, ep, etp, losses, cfg, sd, groups)
        for loss in losses:
            assert_same_lora_step(ref[loss], got[loss], f"{name} {loss}")
