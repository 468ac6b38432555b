"""Loss and gradients of one optimizer step do not depend on TP, PP, DP or the micro-batch split."""

from __future__ import annotations

import pytest
import torch

from rao_megatron.parallel.launch import run_distributed

from .engine_cases import assert_same_step as _assert_same  # test_packing.py imports it from here
from .engine_cases import run_step, synthetic_groups, tiny_model

pytestmark = pytest.mark.distributed

LOSSES = {"rao": {"beta": 0.1, "log_z0": 1.0}, "dpo": {"beta": 0.1}, "simpo": {"beta": 2.0, "gamma": 0.5},
          "bt": {"margin": 0.1}, "sft": {}}


@pytest.fixture(scope="module")
def model():
    return tiny_model(tied=True)


def _run(tmp_path, name, tp, pp, dp, loss, groups, model, groups_per_mb=2, packed=False):
    cfg, sd = model
    out = tmp_path / f"{name}-{loss}-{'packed' if packed else 'padded'}.pt"
    run_distributed(run_step, tp * pp * dp, tp, pp, loss, LOSSES[loss], groups_per_mb, cfg, sd, groups, str(out),
                    packed)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("loss", sorted(set(LOSSES) - {"sft"}))
def test_layouts_match_tp1_pp1(tmp_path, model, loss):
    groups = synthetic_groups(4, 2, seed=1)
    ref = _run(tmp_path, "tp1", 1, 1, 1, loss, groups, model)
    for name, tp, pp, dp in (("tp2", 2, 1, 1), ("pp2", 1, 2, 1), ("tp2pp2", 2, 2, 1), ("dp2", 1, 1, 2)):
        _assert_same(_run(tmp_path, name, tp, pp, dp, loss, groups, model), ref, f"{loss} {name} vs tp1")


def test_microbatch_split_does_not_change_loss_or_grads(tmp_path, model):
    # mixed group sizes would change the shape per micro-batch; a fixed K keeps PP-compatible shapes
    groups = synthetic_groups(4, 3, seed=2)
    one = _run(tmp_path, "1x4", 1, 1, 1, "rao", groups, model, groups_per_mb=4)
    four = _run(tmp_path, "4x1", 1, 1, 1, "rao", groups, model, groups_per_mb=1)
    _assert_same(four, one, "rao 4 micro-batches of 1 group vs 1 of 4")
    two_pp = _run(tmp_path, "pp2-4x1", 1, 2, 1, "rao", groups, model, groups_per_mb=1)
    _assert_same(two_pp, one, "rao PP2 with 4 micro-batches vs 1 micro-batch at PP1")


def _hf_sums(model, groups):
    """P(x) and R(y) straight from the HF model's log-softmax: an independent check of the masks."""
    from transformers import LlamaForCausalLM

    cfg, sd = model
    hf = LlamaForCausalLM(cfg).float().eval()
    hf.load_state_dict({k: v for k, v in sd.items() if k != "score.weight"}, strict=False)
    prompts, responses = [], []
    for g in groups:
        for y in g["responses"]:
            seq = torch.tensor([g["prompt"] + y])
            with torch.no_grad():
                logp = torch.log_softmax(hf(seq).logits[0, :-1].double(), dim=-1)
            per_token = logp.gather(1, seq[0, 1:, None]).squeeze(1)
            n = len(g["prompt"])
            prompts.append(per_token[:n - 1].sum())  # tokens 1 .. |x|-1: the prompt after t0
            responses.append(per_token[n - 1:].sum())  # tokens |x| .. |s|-1: the response
    return torch.stack(prompts).float(), torch.stack(responses).float()


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_forward_only_logps_match_training_forward_and_hf(tmp_path, model, tp, pp):
    from .engine_cases import run_logps

    groups = synthetic_groups(4, 2, seed=3)
    out = tmp_path / "logps.pt"
    cfg, sd = model
    run_distributed(run_logps, tp * pp, tp, pp, cfg, sd, groups, str(out))
    got = torch.load(out, weights_only=True)
    hf_prompt, hf_response = _hf_sums(model, groups)
    torch.testing.assert_close(got["prompt"], hf_prompt, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["response"], hf_response, rtol=1e-5, atol=1e-4)
