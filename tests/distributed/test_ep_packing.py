"""Expert parallelism with packed micro-batches: every rank of the EP group runs the same number of forwards.

The MoE token dispatcher runs collectives over the EP group (built from DP ranks) inside every forward, and
packing makes a rank's micro-batch count follow its tokens. Here the data is chosen so that the two DP
ranks' shares pack into different counts in every phase -- precompute_reference, the step-0 check of the
cache, the training steps and the held-out evaluation -- and the real CLIs run at EP2 over gloo: without
``equal_micro_batches`` a rank waits in the dispatcher's collective until the (bounded) gloo timeout; with
it the losses equal those of the padded layout (``data.packing=false``), which has equal counts by design.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rao_megatron.parallel.launch import run_distributed

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "examples/configs/rao_tiny.yaml")
TIMEOUT_MIN = 1  # the longest wait in a collective: a rank one forward short fails the test instead of hanging it
TRAIN_GROUPS, GLOBAL_BATCH = 15, 14  # one step per epoch; the step-0 check takes 14 / 2 = 7 micro-batches


def _write_data(path: Path) -> None:
    """20 groups of 4 responses, ~40% long ones (a 4-row micro-batch each) and short ones (two to a micro-batch);
    seed 7 deals the ranks unequal counts in every phase (``_counts`` checks that it still does)."""
    rng = random.Random(7)
    rows = []
    for i in range(20):
        size = 34 if rng.random() < 0.4 else 6
        responses = ["".join(rng.choice("abcdefgh") for _ in range(size + j)) for j in range(4)]
        rows.append({"prompt": f"Say {'abcdefgh'[i % 8]}.", "responses": responses,
                     "rewards": [round(rng.random(), 3) for _ in range(4)]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return ["model.preset=tiny-qwen3-moe", "model.moe_aux_loss_coeff=0",  # the aux term differs with the layout
            "parallel.ep=2", f"data.train_path={data}", "data.eval_fraction=0.25", "data.micro_batch_tokens=256",
            "data.groups_per_micro_batch=1", f"train.global_batch_groups={GLOBAL_BATCH}", "train.steps=2",
            "train.warmup_steps=0", "train.reference=cached", "checkpoint.save_at_end=false",
            f"train.output_dir={out}", *extra]


def _counts(data: Path, tmp_path: Path) -> dict[str, list[int]]:
    """Micro-batches per DP rank in each phase when the ranks do not equalise (what today's code ran)."""
    import itertools

    from rao_megatron.config import load_config
    from rao_megatron.data import GroupBatcher
    from rao_megatron.training import run_data

    cfg = load_config(CONFIG, _overrides(data, tmp_path / "unused"))
    groups = run_data.load_groups(cfg, run_data.load_run_tokenizer(cfg), cfg.loss.build().spec)
    assert (len(groups.train), len(groups.heldout)) == (TRAIN_GROUPS, 5)
    settings = {k: v for k, v in run_data.packing_settings(cfg, moe=True).items() if k != "equal_micro_batches"}

    def ranks(part: list, global_batch: int) -> list[GroupBatcher]:
        return [GroupBatcher(part, seq_length=cfg.data.max_length, pad_id=0, groups_per_micro_batch=1,
                             global_batch_groups=global_batch, dp_rank=r, dp_size=2, responses_per_group=4,
                             seed=cfg.data.seed, **settings) for r in range(2)]

    train = ranks(groups.train, GLOBAL_BATCH)
    return {"precompute": [len(list(b.iter_eval_microbatches())) for b in ranks(groups.train + groups.heldout, 2)],
            "step-0 check": [len(list(itertools.islice(b.iter_eval_microbatches(), b.micro_batches_per_step)))
                             for b in train],
            "step 1": [len(b.next_step()) for b in train], "step 2": [len(b.next_step()) for b in train],
            "eval": [len(list(b.iter_eval_microbatches())) for b in ranks(groups.heldout, 2)]}


def _cli_worker(module: str, argv: list[str]) -> None:
    """Worker: the CLI, with Megatron's groups (EP, DP: 30 minutes by default) timing out as fast as the world's."""
    import functools

    from megatron.core import parallel_state as ps

    from ..e2e.train_workers import run_cli_worker

    ps.initialize_model_parallel = functools.partial(ps.initialize_model_parallel,
                                                     distributed_timeout_minutes=TIMEOUT_MIN)
    run_cli_worker(module, argv)


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_packed_ep2_runs_every_phase_and_matches_padded(tmp_path: Path) -> None:
    data = tmp_path / "groups.jsonl"
    _write_data(data)
    counts = _counts(data, tmp_path)
    uneven = [phase for phase, (a, b) in counts.items() if a != b]
    assert len(uneven) == len(counts), f"the data must deal unequal counts in every phase: {counts}"

    def cli(module: str, *args: str) -> None:
        run_distributed(_cli_worker, 2, module, ["--config", CONFIG, *args], timeout_s=60.0 * TIMEOUT_MIN)

    cli("rao_megatron.cli.precompute_reference", *_overrides(data, tmp_path / "unused"))
    assert Path(f"{data}.ref_logps.safetensors").is_file()
    runs = {}
    for name, layout in (("packed", "data.packing=true"), ("padded", "data.packing=false")):
        cli("rao_megatron.cli.train", *_overrides(data, tmp_path / name, layout))  # the step-0 check runs here
        runs[name] = _records(tmp_path / name)
    packed, padded = runs["packed"], runs["padded"]
    assert [r["step"] for r in packed] == [1, 2] and packed[-1]["eval/loss"] is not None
    # the same groups per step, summed in another order: fp32 rounding at step 1, then Adam's early steps
    # (~lr * sign(grad)) may turn rounding noise into a step either way (tests/e2e/test_train.py); padding
    # micro-batches add nothing to the loss or the gradient
    assert packed[0]["loss"] == pytest.approx(padded[0]["loss"], rel=1e-5)
    assert packed[0]["grad_norm"] == pytest.approx(padded[0]["grad_norm"], rel=1e-5)
    assert packed[1]["loss"] == pytest.approx(padded[1]["loss"], rel=1e-3)
    assert packed[1]["eval/loss"] == pytest.approx(padded[1]["eval/loss"], rel=1e-3)
