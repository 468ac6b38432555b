"""Models on CUDA in bf16 with the Transformer Engine layer spec: policy, reference and reward model.

The build runs in a child process (this file run as a script) with its own one-rank NCCL group, so the
pytest process never holds a process group or Megatron's parallel state. tools/gpu_check.py's `models`
check does the same in more detail (buffers, the scorer) and keeps the figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.gpu import TE_ON_CUDA, run_child

pytestmark = TE_ON_CUDA


def _is_te(cls: type) -> bool:
    return any(c.__module__.startswith("transformer_engine") for c in cls.__mro__)


def build_and_report(out: str) -> None:
    """Child process: build each task's chunks in bf16 through the engine, run a forward, write what was seen."""
    from rao_megatron.models import output_weight, tiny_hf_config, unwrap_model
    from rao_megatron.parallel.startup import init_distributed
    from rao_megatron.parallel.state import initialize_model_parallel
    from rao_megatron.training.engine import build_model_chunks

    init_distributed(timeout_s=600)
    initialize_model_parallel(tp=1, pp=1)
    hf = tiny_hf_config("llama")
    tokens = torch.randint(3, hf.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    positions = torch.arange(32, device="cuda").expand(2, 32).contiguous()
    report = {}
    for task in ("policy", "reference", "rm"):
        chunks = build_model_chunks(hf, task=task, params_dtype=torch.bfloat16)
        model = unwrap_model(chunks[0])
        params = [p for c in chunks for p in c.parameters()]
        with torch.no_grad():
            out_t = chunks[0](tokens, positions, None)
        report[task] = {
            "devices": sorted({p.device.type for p in params}),
            "dtypes": sorted({str(p.dtype) for p in params}),
            # named_buffers: Megatron's DDP wrapper shadows Module.buffers with its gradient buffers
            "buffer_devices": sorted({b.device.type for _, b in model.named_buffers()}),
            "te_layers": sum(_is_te(type(m)) for m in model.modules()),
            "sequence_parallel": bool(model.config.sequence_parallel),
            "output": [list(out_t.shape), str(out_t.dtype), out_t.device.type, bool(torch.isfinite(out_t.float()).all())],
            "output_weight": str(output_weight(model).dtype) if task != "rm" else None,
        }
        del chunks, model
    Path(out).write_text(json.dumps(report))


def test_transformer_engine_spec_is_used_on_cuda():
    from rao_megatron.models import tiny_hf_config, transformer_config_from_hf
    from rao_megatron.models.provider import layer_spec

    spec = layer_spec(transformer_config_from_hf(tiny_hf_config("llama"), params_dtype=torch.bfloat16))
    attention = spec.submodules.self_attention.submodules
    assert _is_te(attention.linear_qkv) and _is_te(attention.linear_proj)


def test_bf16_models_on_cuda(tmp_path):
    out = tmp_path / "report.json"
    run_child(__file__, out)
    report = json.loads(out.read_text())
    hidden = tiny_hidden_size()
    for task, seen in report.items():
        assert seen["devices"] == ["cuda"], (task, seen)
        assert seen["dtypes"] == ["torch.bfloat16"], (task, seen)  # every parameter, norms and heads included
        assert seen["buffer_devices"] in ([], ["cuda"]), (task, seen)
        assert seen["te_layers"] > 0, f"{task}: no Transformer Engine layers"
        assert seen["sequence_parallel"] is False  # TP1
        shape, dtype, device, finite = seen["output"]
        assert (dtype, device, finite) == ("torch.bfloat16", "cuda", True), (task, seen)
        assert shape == [2, 32, 1 if task == "rm" else hidden], (task, seen)


def tiny_hidden_size() -> int:
    from rao_megatron.models import tiny_hf_config

    return tiny_hf_config("llama").hidden_size


if __name__ == "__main__":
    build_and_report(sys.argv[1])
