"""The layout rule (``parallel.state.check_world``): the world tiles Megatron's attention layout TP × PP × DP and
its expert layout ETP × EP × PP × EDP; one-line errors in the caller's words. And ``parallel.startup.start``
takes the parallel settings, checking the layout as a config error before Megatron sees it."""

from __future__ import annotations

from typing import Any

import pytest
import torch.distributed as dist

from rao_megatron.config import ConfigError, ParallelConfig
from rao_megatron.parallel import startup
from rao_megatron.parallel.state import check_world


@pytest.mark.parametrize("world,layout", [
    (1, {}),
    (4, {"tp": 2, "pp": 2}),
    (6, {"tp": 3}),
    (4, {"tp": 1, "pp": 2, "ep": 2}),  # EP from the data-parallel ranks
    (8, {"tp": 2, "pp": 2, "ep": 2, "etp": 1}),
    (8, {"tp": 2, "pp": 1, "ep": 4, "etp": 1}),
    (8, {"tp": 2, "pp": 1, "ep": 2}),  # etp None = tp: 2 × 2 × 1
])
def test_layouts_that_tile_the_world_pass(world, layout):
    check_world(world, **{"tp": 1, "pp": 1, **layout})


@pytest.mark.parametrize("world,layout,says", [
    # TP × PP: the attention layout
    (1, {"tp": 2, "pp": 1}, ("world size 1 is not divisible by parallel.tp × parallel.pp = 2 × 1",
                             "launch a multiple of 2 processes", "a divisor of 1")),
    (6, {"tp": 4, "pp": 1}, ("world size 6", "parallel.tp × parallel.pp = 4 × 1", "a multiple of 4 processes")),
    (4, {"tp": 1, "pp": 3}, ("world size 4", "parallel.tp × parallel.pp = 1 × 3", "a multiple of 3 processes")),
    # ETP × EP × PP: the expert layout; the launch count fits both layouts
    (2, {"tp": 1, "pp": 1, "ep": 4}, ("world size 2", "parallel.etp × parallel.ep × parallel.pp = 1 × 4 × 1",
                                      "parallel.etp unset = parallel.tp", "a multiple of 4 processes")),
    (6, {"tp": 2, "pp": 1, "ep": 4, "etp": 1}, ("world size 6", "parallel.etp × parallel.ep × parallel.pp = 1 × 4 × 1",
                                                "a multiple of 4 processes")),
    (2, {"tp": 2, "pp": 1, "ep": 2}, ("parallel.etp × parallel.ep × parallel.pp = 2 × 2 × 1",
                                      "a multiple of 4 processes")),
    (4, {"tp": 2, "pp": 1, "ep": 3, "etp": 1}, ("world size 4", "= 1 × 3 × 1", "a multiple of 6 processes")),
    (12, {"tp": 2, "pp": 2, "ep": 2, "etp": 2}, ("world size 12", "= 2 × 2 × 2", "a multiple of 8 processes")),
    # sizes below 1
    (4, {"tp": 0, "pp": 1}, ("parallel.tp=0", ">= 1")),
    (4, {"tp": 1, "pp": 1, "ep": 0}, ("parallel.ep=0", ">= 1")),
    (4, {"tp": 1, "pp": 1, "etp": 0}, ("parallel.etp=0", ">= 1")),
])
def test_every_rule_names_the_keys_and_the_way_out(world, layout, says):
    with pytest.raises(ValueError) as e:
        check_world(world, **layout)
    message = str(e.value)
    for part in says:
        assert part in message, (part, message)
    assert "\n" not in message


def test_the_error_speaks_the_callers_words():
    with pytest.raises(ConfigError, match=r"parallel\.tp × parallel\.pp"):
        check_world(1, 2, 1, error=ConfigError)
    with pytest.raises(ValueError) as e:  # a command's flags (the reward-model scorer)
        check_world(3, 2, 1, keys="--")
    assert "world size 3 is not divisible by --tp × --pp = 2 × 1" in str(e.value)
    assert "parallel." not in str(e.value)


def _start_without_processes(monkeypatch: pytest.MonkeyPatch, world: int) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(startup, "init_distributed", lambda *a, **k: seen.update(init=(a, k)))
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: world)
    monkeypatch.setattr(startup, "initialize_model_parallel", lambda **k: seen.update(layout=k))
    return seen


def test_start_takes_the_parallel_settings(monkeypatch):
    seen = _start_without_processes(monkeypatch, world=8)
    startup.start(ParallelConfig(tp=2, pp=2, vpp=2, ep=2, etp=1, backend="gloo", device="cpu"), seed=7)
    assert seen["init"] == (("gloo",), {"device": "cpu"})
    assert seen["layout"] == {"tp": 2, "pp": 2, "vpp": 2, "seed": 7, "ep": 2, "etp": 1}


def test_start_refuses_a_layout_that_does_not_tile_the_world_as_a_config_error(monkeypatch):
    seen = _start_without_processes(monkeypatch, world=1)
    with pytest.raises(ConfigError, match=r"world size 1 is not divisible by parallel\.tp × parallel\.pp = 2 × 1"):
        startup.start(ParallelConfig(tp=2), seed=1)
    assert "layout" not in seen  # refused before Megatron builds its groups
