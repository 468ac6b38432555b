"""The local spec's core attention through PyTorch's SDPA (``provider.SdpaDotProductAttention``) computes what
Megatron's ``DotProductAttention`` computes: outputs and input gradients, causal (no mask), with a packed
block-diagonal mask and with the shared-prompt mask, with grouped-query attention, at TP1 and TP2 (heads split
over the ranks). A mask read the wrong way round (True = attend) is caught.
"""

from __future__ import annotations

import pytest
import torch

from rao_megatron.parallel.launch import run_distributed

pytestmark = pytest.mark.distributed


def compare(tp: int, out_prefix: str, invert_mask: bool) -> None:
    """Worker: both modules on the same q, k, v; saves the largest differences per case."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from rao_megatron.data.packing import packed_attention_mask
    from rao_megatron.models import provider
    from rao_megatron.parallel.state import initialize_model_parallel

    initialize_model_parallel(tp=tp, pp=1)
    if invert_mask:  # the mistake the test must catch: SDPA's boolean mask means "attend", Megatron's "masked"
        real = F.scaled_dot_product_attention

        def wrong(q, k, v, attn_mask=None, **kw):
            return real(q, k, v, attn_mask=None if attn_mask is None else ~attn_mask, **kw)

        provider.F = type("F", (), {"scaled_dot_product_attention": staticmethod(wrong)})
    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=8, num_query_groups=2,
                            tensor_model_parallel_size=tp, attention_dropout=0.0, hidden_dropout=0.0)
    args = dict(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    ours, theirs = provider.SdpaDotProductAttention(**args), DotProductAttention(**args)
    heads, groups, d, s, b = 8 // tp, 2 // tp, 8, 12, 2
    torch.manual_seed(0)
    q, k, v = (torch.randn(s, b, n, d) for n in (heads, groups, groups))
    segments = torch.tensor([[0] * 5 + [1] * 4 + [-1] * 3, [0] * 12])
    shared = torch.tensor([[2] * 4 + [0] * 3 + [1] * 3 + [-1] * 2, [0] * 12])  # a prompt (segment 2), two responses
    prefix = torch.tensor([[-2] * 4 + [2] * 6 + [-2] * 2, [-2] * 12])
    masks = {"causal": None, "packed": packed_attention_mask(segments),
             "shared_prompt": packed_attention_mask(shared, prefix)}
    results = {}
    for name, mask in masks.items():
        outs = []
        for module in (ours, theirs):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = module(*leaves, mask)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            outs.append((out.detach(), [t.grad for t in leaves]))
        (a, ga), (c, gc) = outs
        results[name] = {"shape": tuple(a.shape) == tuple(c.shape) == (s, b, heads * d),
                         "out": (a - c).abs().max().item(),
                         "grad": max((x - y).abs().max().item() for x, y in zip(ga, gc))}
    torch.save(results, f"{out_prefix}.rank{dist.get_rank()}.pt")


def _run(tmp_path, tp: int, invert_mask: bool = False) -> list[dict]:
    prefix = str(tmp_path / f"tp{tp}{'_inverted' if invert_mask else ''}")
    run_distributed(compare, tp, tp, prefix, invert_mask)
    return [torch.load(f"{prefix}.rank{r}.pt") for r in range(tp)]


@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_core_attention_equals_megatrons(tmp_path, tp):
    for rank, res in enumerate(_run(tmp_path, tp)):
        for name, r in res.items():
            # fp32, O(1) inputs: the fused kernel sums in another order (seen ~5e-7); a wrong mask is O(0.1-1) off
            assert r["shape"] and r["out"] < 1e-5 and r["grad"] < 1e-5, (tp, rank, name, r)


def test_an_inverted_mask_is_caught(tmp_path):
    res = _run(tmp_path, 1, invert_mask=True)[0]
    assert res["causal"]["out"] < 1e-5  # no mask there
    assert not res["packed"]["out"] < 1e-2 and not res["shared_prompt"]["out"] < 1e-2, res  # (NaN: rows all masked)
