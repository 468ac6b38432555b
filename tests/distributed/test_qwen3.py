"""Qwen3 (dense, q/k norm, tied) and Qwen3-MoE (router + experts) on CPU gloo ranks: logits vs HF and the
in-memory round trip at every layout the CPU runs (TP, PP, EP, ETP), the file converters, every loss at
TP/PP/DP/EP/ETP against TP1, and the MoE load-balancing term against its formula on HF's router logits.

What the CPU cannot run: MoE *training* at TP > 1 (Megatron's MoE layer demands sequence parallelism there,
which needs Transformer Engine) -- forward passes at TP2 run and are checked here; the all-to-all token
dispatcher (CUDA streams) -- the all-gather one runs EP over gloo; TE's grouped GEMM. ``tools/gpu_check.py``
covers those on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from rao_megatron.models.hf_mappings import hf_checkpoint_layout
from rao_megatron.parallel.launch import run_distributed

from .engine_cases import assert_same_step, synthetic_groups
from .qwen3_cases import AUX_COEFF, LOSSES, hf_load_balancing_terms, hf_model, model_and_state, run_losses

pytestmark = pytest.mark.distributed

SEQ, BATCH = 24, 2
#: name: (world, tp, pp, ep, etp, families)
LAYOUTS: dict[str, tuple[int, int, int, int, int | None, tuple[str, ...]]] = {
    "tp2": (2, 2, 1, 1, None, ("qwen3", "qwen3_moe")),
    "pp2": (2, 1, 2, 1, None, ("qwen3", "qwen3_moe")),
    "ep2": (2, 1, 1, 2, None, ("qwen3_moe", "qwen3_moe_unnormalised")),
    "etp2": (2, 1, 1, 1, 2, ("qwen3_moe",)),
    "tp2ep2": (2, 2, 1, 2, 1, ("qwen3_moe",)),
}


def _config(name: str) -> Any:
    from rao_megatron.models.hf_config import tiny_hf_config

    if name == "qwen3_moe_unnormalised":  # HF: top-k softmax weights kept as they are (Megatron: pre-softmax)
        return tiny_hf_config("qwen3_moe", norm_topk_prob=False)
    return tiny_hf_config(name)


# ---------------------------------------------------------------- logits + in-memory round trip per layout


def _logits_worker(tp: int, pp: int, ep: int, etp: int | None, names: tuple[str, ...]) -> None:
    import torch.distributed as dist

    from rao_megatron.conversion import load_hf_state_dict_into_megatron, megatron_to_hf_state_dict
    from rao_megatron.models import build_gpt_model
    from rao_megatron.parallel.state import destroy_model_parallel, initialize_model_parallel

    from .engine_cases import schedule_forward

    initialize_model_parallel(tp=tp, pp=pp, ep=ep, etp=etp)
    for name in names:
        cfg = _config(name)
        hf = hf_model(cfg)
        hf_sd = dict(hf_checkpoint_layout(hf.state_dict()))
        model = build_gpt_model(cfg)
        assert model.config.num_moe_experts == getattr(cfg, "num_experts", None)
        load_hf_state_dict_into_megatron(model, hf.state_dict(), cfg)  # fused in-memory experts are read too
        ids = torch.randint(3, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
        logits = schedule_forward([model], ids)
        if logits is not None:
            with torch.no_grad():
                ref = hf(ids).logits
            diff = (logits[..., : cfg.vocab_size] - ref).abs().max().item()
            assert diff <= 1e-5, f"{name} tp={tp} pp={pp} ep={ep} etp={etp}: max |logits - hf| = {diff:.2e}"
        back = megatron_to_hf_state_dict(model, cfg)
        expected = set(hf_sd) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
        assert set(back) == expected, sorted(set(back) ^ expected)
        for key, tensor in back.items():
            assert torch.equal(tensor, hf_sd[key]), f"{name}: {key} differs after the round trip"
        if dist.get_rank() == 0 and "moe" in name:
            experts = [n for n, _ in model.named_parameters() if ".experts." in n]
            # this stage's layers x (fc1, fc2) x this rank's experts
            assert len(experts) == len(model.decoder.layers) * 2 * cfg.num_experts // ep
    destroy_model_parallel()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_and_round_trip_match_hf(layout: str) -> None:
    world, tp, pp, ep, etp, names = LAYOUTS[layout]
    run_distributed(_logits_worker, world, tp, pp, ep, etp, names)


def test_logits_match_hf_at_tp1() -> None:
    run_distributed(_logits_worker, 1, 1, 1, 1, None, ("qwen3", "qwen3_moe", "qwen3_moe_unnormalised"))


# ---------------------------------------------------------------- file converters


def _save(cfg: Any, out: Path) -> Path:
    hf_model(cfg).save_pretrained(out)
    return out


def _same_files(a_dir: Path, b_dir: Path) -> None:
    from rao_megatron.conversion.hf_io import LazyHFStateDict

    a, b = LazyHFStateDict(a_dir), LazyHFStateDict(b_dir)
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after the round trip"


@pytest.mark.parametrize("name, write, reads", [
    ("qwen3", dict(tp=2), [dict(tp=1, pp=1), dict(tp=1, pp=2)]),
    ("qwen3_moe", dict(ep=2), [dict(tp=1, pp=1), dict(tp=1, pp=2, ep=1), dict(tp=2, etp=1), dict(tp=1, etp=2)]),
])
def test_converters_round_trip_and_read_at_other_layouts(name: str, write: dict, reads: list[dict],
                                                         tmp_path: Path) -> None:
    from rao_megatron.conversion.compare import compare_outputs, hf_outputs, megatron_outputs
    from rao_megatron.conversion.convert import hf_to_megatron, megatron_to_hf
    from rao_megatron.conversion.hf_io import LazyHFStateDict
    from rao_megatron.models.checkpoint import read_checkpoint_meta

    cfg = _config(name)
    hf = _save(cfg, tmp_path / "hf")
    files = LazyHFStateDict(hf)
    if name == "qwen3_moe":  # the checkpoint files hold one tensor per expert, as Qwen's do
        assert "model.layers.0.mlp.experts.3.down_proj.weight" in files and "model.layers.0.mlp.gate.weight" in files
    ckpt = hf_to_megatron(hf, tmp_path / "mg", progress=False, **write)
    layout = read_checkpoint_meta(ckpt)["provenance"]["written_at_layout"]
    assert all(layout[k] == v for k, v in write.items())
    back = megatron_to_hf(ckpt, tmp_path / "back", progress=False)
    _same_files(hf, back)
    assert json.loads((back / "config.json").read_text())["architectures"] == cfg.architectures
    ids = torch.randint(0, cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    ref = hf_outputs(hf, ids)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(back)(ids).logits, ref)
    for read in reads:
        result = compare_outputs(megatron_outputs(ckpt, ids, **read), ref, torch.full((3,), 20))
        assert result.max_abs_diff <= 1e-5, (read, result)


def test_compare_cli_at_ep2_and_layout_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rao_megatron.cli.convert import cli

    hf = _save(_config("qwen3_moe"), tmp_path / "hf")
    assert cli(["hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "mg"), "--ep", "2", "--no-progress"]) == 0
    assert "EP2" in capsys.readouterr().out
    assert cli(["compare", "--hf", str(hf), "--megatron", str(tmp_path / "mg"), "--ep", "2"]) == 0
    out = capsys.readouterr().out
    assert "EP2" in out and out.rstrip().endswith("OK")
    assert cli(["hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "x"), "--ep", "3"]) == 2
    assert "--ep=3 must divide num_experts=4" in capsys.readouterr().err
    dense = _save(_config("qwen3"), tmp_path / "dense")
    assert cli(["hf-to-megatron", "--hf", str(dense), "--out", str(tmp_path / "y"), "--ep", "2"]) == 2
    assert "qwen3 is dense" in capsys.readouterr().err


# ---------------------------------------------------------------- every loss at every layout vs TP1

# TP2 trains only the dense model: Megatron refuses MoE training at TP > 1 without sequence parallelism
TRAIN_LAYOUTS = {
    "qwen3": {"tp2": (2, 2, 1, 1, None), "pp2": (2, 1, 2, 1, None), "dp2": (2, 1, 1, 1, None),
              "tp2pp2": (4, 2, 2, 1, None)},
    "qwen3_moe": {"pp2": (2, 1, 2, 1, None), "dp2": (2, 1, 1, 1, None), "ep2": (2, 1, 1, 2, None),
                  "etp2": (2, 1, 1, 1, 2), "pp2ep2": (4, 1, 2, 2, None), "ep2etp2": (4, 1, 1, 2, 2)},
}


def _run(tmp_path: Path, tag: str, world: int, tp: int, pp: int, ep: int, etp: int | None, model: Any,
         groups: list, aux: float = AUX_COEFF, losses: list[str] | None = None) -> dict[str, Any]:
    cfg, sd = model
    out = tmp_path / f"{tag}.pt"
    run_distributed(run_losses, world, tp, pp, ep, etp, losses or list(LOSSES), aux, cfg, sd, groups, str(out))
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("family", list(TRAIN_LAYOUTS))
def test_every_loss_at_every_layout_matches_tp1(family: str, tmp_path: Path) -> None:
    model = model_and_state(family)
    groups = synthetic_groups(8 if family == "qwen3_moe" else 4, 2, seed=1)  # DP4 (ep2etp2) needs 4 micro-batches
    ref = _run(tmp_path, "tp1", 1, 1, 1, 1, None, model, groups)
    for loss, res in ref.items():  # the reward model has the same routers
        assert bool(res["moe"]) is (family == "qwen3_moe"), (loss, res["moe"])
    for name, (world, tp, pp, ep, etp) in TRAIN_LAYOUTS[family].items():
        got = _run(tmp_path, name, world, tp, pp, ep, etp, model, groups)
        for loss in LOSSES:
            assert_same_step(got[loss], ref[loss], f"{family} {loss} {name} vs tp1")


def test_moe_training_at_tp2_is_refused_with_a_config_error() -> None:
    from rao_megatron.config import ConfigError, load_config
    from rao_megatron.training.model_init import check_model_layout

    cfg = load_config(None, ["model.preset=tiny-qwen3-moe", "parallel.tp=2"])
    with pytest.raises(ConfigError, match="sequence_parallel"):
        check_model_layout(cfg, _config("qwen3_moe"))
    check_model_layout(cfg, _config("qwen3_moe"), task="reference")  # forward only (reference log-probs): fine
    check_model_layout(load_config(None, ["model.preset=tiny-qwen3", "parallel.tp=2"]), _config("qwen3"))


# ---------------------------------------------------------------- the load-balancing term


def test_moe_aux_loss_is_the_switch_loss_added_with_its_coefficient(tmp_path: Path) -> None:
    """The metric is Megatron's per-layer switch loss computed from HF's router logits, and the gradient
    difference between coefficient c and 0 is c times that term's gradient: the term enters the objective
    as c × Σ_layers L_l (mean over micro-batches), next to the preference loss -- at TP1 and at EP2."""
    model = model_and_state("qwen3_moe")
    cfg = model[0]
    groups = synthetic_groups(4, 2, seed=1)
    term, term_grads = hf_load_balancing_terms(cfg, groups)
    for tag, world, ep in (("tp1", 1, 1), ("ep2", 2, 2)):
        with_aux = _run(tmp_path, f"{tag}-aux", world, 1, 1, ep, None, model, groups, losses=["rao"])["rao"]
        without = _run(tmp_path, f"{tag}-noaux", world, 1, 1, ep, None, model, groups, aux=0.0, losses=["rao"])["rao"]
        assert without["moe"] == {}  # coefficient 0: no term, no metric
        assert with_aux["loss"] == pytest.approx(without["loss"], rel=1e-6)  # the reported loss is the preference loss
        moe = with_aux["moe"]
        assert moe["moe/aux_loss"] == pytest.approx(AUX_COEFF * float(term), rel=1e-5), tag
        assert moe["moe/load_balancing_loss"] == pytest.approx(float(term) / cfg.num_hidden_layers, rel=1e-5), tag
        assert moe["moe/load_balancing_loss"] > 1.0  # a random router is not balanced
        routers = [k for k in term_grads if k.endswith("mlp.gate.weight")]
        assert routers
        for key in routers + ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.0.up_proj.weight"]:
            diff = with_aux["grads"][key] - without["grads"][key]
            expected = AUX_COEFF * term_grads.get(key, torch.zeros_like(diff))
            torch.testing.assert_close(diff, expected, rtol=1e-3, atol=1e-6 * max(1.0, expected.abs().max().item()),
                                       msg=lambda m, key=key, tag=tag: f"{tag}: {key}: {m}")
        assert (with_aux["grads"][routers[0]] - without["grads"][routers[0]]).abs().max() > 1e-4


# ---------------------------------------------------------------- the CLI at the largest CPU layout


def test_tiny_qwen3_moe_rao_trains_through_the_cli_at_pp2_ep2(tmp_path: Path) -> None:
    """4 gloo ranks: PP2 x EP2 (DP2); then the trained checkpoint converts to an HF Qwen3-MoE that loads."""
    from rao_megatron.conversion.convert import megatron_to_hf

    from ..e2e.train_workers import run_cli_worker

    root = Path(__file__).resolve().parents[2]
    common = ["--config", str(root / "examples/configs/rao_tiny.yaml"),
              f"data.train_path={root / 'examples/data/tiny_groups.jsonl'}", "model.preset=tiny-qwen3-moe",
              "train.steps=3", "train.eval_every=0", "train.reference=on_the_fly", "model.moe_aux_loss_coeff=0.01"]
    out = tmp_path / "pp2ep2"
    run_distributed(run_cli_worker, 4, "rao_megatron.cli.train",
                    [*common, f"train.output_dir={out}", "parallel.pp=2", "parallel.ep=2"])
    ref = tmp_path / "tp1"
    run_distributed(run_cli_worker, 1, "rao_megatron.cli.train",
                    [*common, f"train.output_dir={ref}", "checkpoint.save_at_end=false"])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = json.loads((ref / "metrics.jsonl").read_text().splitlines()[0])
    assert len(records) == 3 and all(r["update_ok"] for r in records)
    assert records[0]["loss"] == pytest.approx(first["loss"], rel=1e-5)  # same weights, same data at step 1
    for r in records:
        assert r["moe/load_balancing_loss"] >= 1.0 - 1e-6 and r["moe/aux_loss"] > 0
    assert records[0]["moe/aux_loss"] == pytest.approx(0.01 * 2 * records[0]["moe/load_balancing_loss"], rel=1e-6)
    back = megatron_to_hf(out / "checkpoints", tmp_path / "hf", progress=False)
    model = AutoModelForCausalLM.from_pretrained(back)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 3]])).logits).all()


def test_distributed_optimizer_checkpoint_saved_at_ep2_resumes_at_ep1(tmp_path: Path) -> None:
    """Expert weights sit in their own optimizer at every layout (``mark_expert_params``), so a training
    checkpoint written at EP2 resumes at EP1 (and EP2) with the same next losses."""
    import shutil

    from ..e2e.train_workers import run_cli_worker

    root = Path(__file__).resolve().parents[2]
    common = ["--config", str(root / "examples/configs/rao_tiny.yaml"),
              f"data.train_path={root / 'examples/data/tiny_groups.jsonl'}", "model.preset=tiny-qwen3-moe",
              "train.eval_every=0", "train.reference=on_the_fly", "parallel.distributed_optimizer=true"]
    saved = tmp_path / "saved"
    run_distributed(run_cli_worker, 2, "rao_megatron.cli.train",
                    [*common, f"train.output_dir={saved}", "parallel.ep=2", "train.steps=2"])
    losses = {}
    for ep in (1, 2):
        out = tmp_path / f"ep{ep}"
        shutil.copytree(saved, out)
        run_distributed(run_cli_worker, ep, "rao_megatron.cli.train",
                        [*common, f"train.output_dir={out}", f"parallel.ep={ep}", "train.steps=4",
                         "checkpoint.save_at_end=false"])
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        losses[ep] = [r["loss"] for r in records[2:]]
    assert losses[1] == pytest.approx(losses[2], rel=1e-5)
