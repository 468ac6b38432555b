"""LoRA on the Transformer Engine spec equals LoRA on the local spec (same GPU, weights and adapters): the fused
LayerNorm-linear, TE row/column linears and the experts' TE linears. The comparison is tools/gpu_check.py's
``lora`` check (``compare_lora_specs``), run here in a one-rank child process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.gpu import TE_ON_CUDA, run_child

pytestmark = TE_ON_CUDA


def test_lora_on_the_te_spec_matches_the_local_spec(tmp_path):
    from tools.gpucheck.checks.lora import LORA_FAMILIES, judge_lora

    out = tmp_path / "lora.json"
    run_child(__file__, out, timeout=600)
    report = json.loads(out.read_text())
    for fam in LORA_FAMILIES:
        row = judge_lora(fam, report[fam])
        assert row.verdict == "PASS", row.reason


if __name__ == "__main__":
    from tools.gpucheck.checks.lora import LORA_FAMILIES, compare_lora_specs
    from tools.gpucheck.workers import init_single_rank

    init_single_rank()
    Path(sys.argv[1]).write_text(json.dumps({fam: compare_lora_specs(fam) for fam in LORA_FAMILIES}))
