"""Packed micro-batches on CUDA with Transformer Engine: THD + PackedSeqParams give the padded log-probs.

The CPU half (local spec, block-diagonal mask) is tests/distributed/test_packing.py. Here the same groups
run through the TE model in fp32 and bf16, padded (causal rows) and packed (one THD sequence per
micro-batch with ``cu_seqlens``); per-sequence sums must agree. Child process, as in test_models_gpu.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.gpu import REPO, TE_ON_CUDA, run_child

pytestmark = TE_ON_CUDA


def compare(out: str) -> None:
    """Child: padded vs packed per-sequence log-prob sums of the same groups, keyed by sequence."""
    sys.path.insert(0, str(REPO))
    from rao_megatron.models.hf_state import load_hf_state_dict_into_megatron
    from rao_megatron.models.provider import uses_thd
    from rao_megatron.parallel.state import initialize_model_parallel
    from rao_megatron.training.engine import build_model_chunks, sequence_logps
    from tests.distributed.engine_cases import microbatches, synthetic_groups, tiny_model

    initialize_model_parallel(tp=1, pp=1)
    cfg, sd = tiny_model(tied=True)
    groups = synthetic_groups(6, 3, seed=7, max_response=6)
    report = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        chunks = build_model_chunks(cfg, task="reference", params_dtype=dtype)
        load_hf_state_dict_into_megatron(chunks, {k: v for k, v in sd.items() if k != "score.weight"}, cfg)
        sums = {}
        for layout, packed in (("padded", False), ("packed", True)):
            mbs = microbatches(groups, 2, packed=packed)
            got = sequence_logps(chunks, mbs, vocab_size=cfg.vocab_size)
            sums[layout] = {int(k): float(r) for mb, (_, resp) in zip(mbs, got)
                            for k, r in zip(mb["seq_keys"].tolist(), resp.tolist())}
        diff = max(abs(sums["padded"][k] - sums["packed"][k]) for k in sums["padded"])
        report[name] = {"thd": uses_thd(chunks[0]), "max_abs_diff": diff, "sequences": len(sums["packed"]),
                        "same_keys": sorted(sums["padded"]) == sorted(sums["packed"])}
    Path(out).write_text(json.dumps(report))


def test_packed_thd_logps_equal_padded_on_cuda(tmp_path):
    out = tmp_path / "report.json"
    run_child(__file__, out)
    report = json.loads(out.read_text())
    for name, bound in (("fp32", 1e-3), ("bf16", 0.25)):  # per-sequence sums of up to ~10 tokens
        seen = report[name]
        assert seen["thd"] and seen["same_keys"] and seen["sequences"] == 18, (name, seen)
        assert seen["max_abs_diff"] <= bound, (name, seen)


if __name__ == "__main__":
    compare(sys.argv[1])
