"""The shared-prompt layout on CUDA (#31): what runs where.

Transformer Engine's packed (THD) attention takes sequence boundaries, not a mask, so a group cannot hold its
prompt once there: with TE on CUDA ``data.shared_prompt`` unset resolves to one prompt per response and
``true`` is refused in one line (``run_data.shared_prompt``). A model built with the local spec on CUDA takes
the explicit mask, as on the CPU: its per-sequence log-prob sums with shared prompts equal the unshared
packed layout's (the per-token RoPE positions, ``models.provider.rope_at_positions``, computed on the GPU).
Child process, as in test_packing_gpu.py; the CPU half is tests/distributed/test_shared_prompt.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.gpu import REPO, TE_ON_CUDA, run_child

pytestmark = TE_ON_CUDA


def test_shared_prompt_falls_back_under_te_and_an_explicit_true_is_refused():
    from rao_megatron.config import ConfigError, load_config
    from rao_megatron.training import run_data

    tiny = REPO / "examples/configs/rao_tiny.yaml"
    assert run_data.shared_prompt(load_config(tiny, ["data.packing=true"])) is False
    with pytest.raises(ConfigError) as e:
        run_data.shared_prompt(load_config(tiny, ["data.packing=true", "data.shared_prompt=true"]))
    assert "data.shared_prompt" in str(e.value) and "\n" not in str(e.value)


def compare(out: str) -> None:
    """Child: local-spec fp32 model on CUDA, per-sequence sums with and without shared prompts."""
    sys.path.insert(0, str(REPO))
    from rao_megatron.models.hf_state import load_hf_state_dict_into_megatron
    from rao_megatron.models.provider import uses_thd
    from rao_megatron.parallel.startup import init_distributed
    from rao_megatron.parallel.state import initialize_model_parallel
    from rao_megatron.training.engine import build_model_chunks, sequence_logps
    from tests.distributed.engine_cases import microbatches, synthetic_groups, tiny_model

    init_distributed(timeout_s=600)
    initialize_model_parallel(tp=1, pp=1)
    cfg, sd = tiny_model(tied=True)
    sd = {k: v * 3 if v.dim() == 2 else v for k, v in sd.items() if k != "score.weight"}  # as test_packing_gpu
    groups = synthetic_groups(6, 3, seed=7, max_response=6)
    chunks = build_model_chunks(cfg, task="reference", use_te=False)
    load_hf_state_dict_into_megatron(chunks, sd, cfg)
    sums = {}
    for shared in (False, True):
        mbs = microbatches(groups, 2, packed=True, rows=2 if shared else None, shared=shared)
        got = sequence_logps(chunks, mbs, vocab_size=cfg.vocab_size)
        sums[shared] = {int(k): (float(p), float(r)) for mb, (ps_, rs) in zip(mbs, got)
                        for k, p, r in zip(mb["seq_keys"].tolist(), ps_.tolist(), rs.tolist())}
    keys = sorted(sums[False])
    report = {"device": str(next(chunks[0].parameters()).device), "thd": uses_thd(chunks[0]),
              "same_keys": keys == sorted(sums[True]), "sequences": len(keys),
              "max_abs_diff": max(abs(a - b) for k in keys for a, b in zip(sums[False][k], sums[True][k]))}
    Path(out).write_text(json.dumps(report))


def test_shared_prompt_equals_unshared_with_the_local_spec_on_cuda(tmp_path):
    out = tmp_path / "report.json"
    run_child(__file__, out)
    report = json.loads(out.read_text())
    assert report["device"].startswith("cuda") and not report["thd"], report
    assert report["same_keys"] and report["sequences"] == 18, report
    # fp32 on both sides (TF32 may round the GEMMs): the same tokens in other rows; attention to the wrong
    # context, or RoPE at row positions, moves a sum by O(0.1-1) (tests/distributed/test_shared_prompt.py)
    assert report["max_abs_diff"] <= 1e-2, report


if __name__ == "__main__":
    compare(sys.argv[1])
