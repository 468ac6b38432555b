"""The cluster configs in examples/configs load and validate, and keep the settings docs/cluster.md explains."""

from __future__ import annotations

from pathlib import Path

import pytest

from rao_megatron.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
CLUSTER = ["rao_llama3_8b", "rao_qwen25_7b", "dpo_llama3_8b", "rm_llama3_8b", "sft_llama3_8b"]


@pytest.mark.parametrize("name", CLUSTER)
def test_cluster_config_loads(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.dtype == "bf16" and cfg.model.preset is None and cfg.model.hf_config
    assert cfg.parallel.tp == 2 and cfg.parallel.pp == 1
    assert cfg.checkpoint.resume == "auto"  # a requeued job resumes
    task = {"rm": "rm", "sft": "sft"}.get(name.split("_")[0], "policy")
    assert cfg.train.task == task


def test_rao_hyperparameters_follow_the_paper() -> None:
    for name in ("rao_llama3_8b", "rao_qwen25_7b"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert (cfg.loss.name, cfg.loss.beta, cfg.loss.z0, cfg.train.lr) == ("rao", 0.1, 50.0, 5e-7)
        assert cfg.train.reference == "cached"


@pytest.mark.parametrize("loss", ["dpo", "ipo", "slic", "simpo", "orpo", "rpo", "cal_dpo"])
def test_baseline_config_takes_every_loss(loss: str) -> None:
    # what LOSS=... in slurm/dpo_llama3.sbatch does
    assert load_config(CONFIGS / "dpo_llama3_8b.yaml", [f"loss.name={loss}"]).loss.name == loss


def test_placeholders_are_overridable() -> None:
    # what HF_MODEL / INIT_CHECKPOINT / DATA / TP / ... in slurm/common.sh map to
    cfg = load_config(CONFIGS / "rao_llama3_8b.yaml", ["model.hf_config=/m", "model.init_checkpoint=/c",
                                                       "data.train_path=/d.jsonl", "parallel.tp=4",
                                                       "parallel.sequence_parallel=false"])
    assert (cfg.model.hf_config, cfg.model.init_checkpoint, cfg.data.train_path, cfg.parallel.tp) == \
        ("/m", "/c", "/d.jsonl", 4)


def test_every_config_the_docs_and_scripts_name_exists_and_loads() -> None:
    import re

    repo = CONFIGS.parents[1]
    sources = [repo / "README.md", repo / "docs/cluster.md", repo / "examples/nemo_run/pipeline.py",
               *sorted((repo / "slurm").glob("*.sbatch"))]
    named = {m for src in sources for m in re.findall(r"examples/configs/[\w.-]+\.yaml", src.read_text())}
    assert {"examples/configs/rao_llama3_8b.yaml", "examples/configs/rao_qwen25_7b.yaml"} <= named
    for rel in sorted(named):
        assert (repo / rel).is_file(), f"{rel} is referenced but missing"
        load_config(repo / rel)
