"""A model checkpoint written under one layer spec loads under the other, both ways, every family, bit for bit.

The converters build the local spec on CPU; training on CUDA builds the Transformer Engine spec. TE is not
importable here, so the TE side is a view of a local-spec model that requests exactly the keys the TE spec
requests. What differs, read from megatron-core's ``gpt_layer_specs.py`` (0.16.1 and 0.19) and
``TransformerBlock`` (``LayerNormImpl = TENorm`` whenever TE imports):

- every norm the TE spec builds as ``TENorm`` (``te.pytorch.RMSNorm``) has an ``_extra_state`` entry (FP8
  metadata) that torch's ``RMSNorm`` lacks: ``decoder.final_layernorm`` always, ``q_layernorm`` /
  ``k_layernorm`` with q/k norm (Qwen3), ``pre_mlp_layernorm`` in MoE layers;
- a MoE layer keeps ``pre_mlp_layernorm`` as its own module under the TE spec, while the local spec maps it to
  ``mlp.linear_fc1.layer_norm_`` (its ``sharded_state_dict_keys_map``) in dense and MoE layers alike.
Everything else (fused QKV with ``linear_qkv.layer_norm_weight``, linears' ``_extra_state``, expert weights of
``TEGroupedMLP`` vs ``SequentialMLP``) has the same global keys under both specs.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

from rao_megatron.models import build_gpt_model, tiny_hf_config
from rao_megatron.models.checkpoint import load_model_checkpoint, save_model_checkpoint
from rao_megatron.parallel.launch import run_distributed
from rao_megatron.parallel.state import destroy_model_parallel, initialize_model_parallel

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")
MOE_NORM_LOCAL = ".mlp.linear_fc1.layer_norm_"
MOE_NORM_TE = ".pre_mlp_layernorm."


def _payload(key: str) -> torch.Tensor:
    """A distinct stand-in for one TE module's serialized FP8 metadata (TE stores a uint8 tensor)."""
    return torch.tensor(list(key.encode())[-8:], dtype=torch.uint8)


class TESpecView:
    """A local-spec model that saves and loads the Transformer Engine spec's keys (see the module docstring).

    ``extra`` holds the TE norms' ``_extra_state`` values: written from it, and filled in when loaded.
    """

    def __init__(self, model: torch.nn.Module):
        self.model, self.moe = model, bool(model.config.num_moe_experts)
        self.extra: dict[str, torch.Tensor] = {}

    def sharded_state_dict(self) -> dict[str, Any]:
        local = self.model.sharded_state_dict()
        out: dict[str, Any] = {}
        for name, entry in local.items():
            if self.moe and MOE_NORM_LOCAL in entry.key:
                entry.key = entry.key.replace(MOE_NORM_LOCAL, MOE_NORM_TE)
            out[name] = entry
            norm = self._te_norm(name)
            if norm is None:
                continue
            extra_name = f"{norm}._extra_state"
            value = self.extra.setdefault(extra_name, _payload(extra_name))
            if norm == "decoder.final_layernorm":
                out[extra_name] = make_sharded_object_for_checkpoint(value, extra_name)
            else:  # a layer's module: laid out on the layer axis like the layer's other objects
                layer = ".".join(name.split(".")[:3]) + "."
                like = next(e for n, e in local.items() if n.startswith(layer) and isinstance(e, ShardedObject))
                key = entry.key.rsplit(".", 1)[0] + "._extra_state"
                out[extra_name] = dataclasses.replace(like, key=key, data=value)
        return out

    def _te_norm(self, name: str) -> str | None:
        """The module of a TE norm whose weight ``name`` is (it then has an ``_extra_state``), else None."""
        module = name.rsplit(".", 1)[0]
        if module == "decoder.final_layernorm" or module.endswith(("q_layernorm", "k_layernorm")):
            return module
        if self.moe and module.endswith(".pre_mlp_layernorm"):
            return module
        return None

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> Any:
        for name in [n for n in state if n.endswith("_extra_state") and self._te_norm(n) is not None]:
            self.extra[name] = state.pop(name)
        return self.model.load_state_dict(state, strict=strict)


def _model(family: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_gpt_model(tiny_hf_config(family))
    with torch.no_grad():  # norms start at ones: make every value distinct so a wrong mapping shows
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def _same_values(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    names = [n for n in sa if not n.endswith("_extra_state")]
    assert names and names == [n for n in sb if not n.endswith("_extra_state")]
    for n in names:
        assert torch.equal(sa[n], sb[n]), n


def _round_trip(family: str, writer_te: bool, reader_te: bool) -> None:
    initialize_model_parallel(tp=1, pp=1)
    try:
        written, read = _model(family, 1), _model(family, 2)
        writer = TESpecView(written) if writer_te else written
        reader = TESpecView(read) if reader_te else read
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ckpt"
            save_model_checkpoint(writer, path, {"family": family})
            load_model_checkpoint(reader, path)
        _same_values(written, read)
        if writer_te and reader_te:  # TE to TE: the norms' metadata comes back as written
            assert reader.extra.keys() == writer.extra.keys()
            for n, v in writer.extra.items():
                assert torch.equal(reader.extra[n], v), n
        if reader_te and not writer_te:  # not in a local-spec file: the TE norms keep their own state
            assert all(torch.equal(v, _payload(n)) for n, v in reader.extra.items())
    finally:
        destroy_model_parallel()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("writer_te,reader_te", [(False, True), (True, False), (True, True)],
                         ids=["local_to_te", "te_to_local", "te_to_te"])
def test_checkpoint_loads_under_the_other_layer_spec(family: str, writer_te: bool, reader_te: bool) -> None:
    run_distributed(_round_trip, 1, family, writer_te, reader_te)


def _wrong_family() -> None:
    initialize_model_parallel(tp=1, pp=1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "llama"
            save_model_checkpoint(_model("llama", 1), path, {})
            with pytest.raises(KeyError, match=r"checkpoint .*llama lacks .*q_layernorm"):
                load_model_checkpoint(_model("qwen3", 2), path)
    finally:
        destroy_model_parallel()


def test_a_key_missing_under_both_specs_is_one_line_naming_the_checkpoint() -> None:
    run_distributed(_wrong_family, 1)
