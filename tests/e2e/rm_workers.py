"""Workers for the reward-model tests that look inside the model (run in forked gloo ranks)."""

from __future__ import annotations


def rm_init_worker(config: str, init_checkpoint: str, result_path: str) -> None:
    """Build the RM as training does from ``init_checkpoint``; record where its head and embedding came from."""
    import json

    import torch

    from rao_megatron.config import load_config
    from rao_megatron.models.checkpoint import load_model_checkpoint, read_checkpoint_meta
    from rao_megatron.models.provider import as_chunks
    from rao_megatron.parallel import startup
    from rao_megatron.training import model_init, run_data
    from rao_megatron.training.engine import build_model_chunks

    cfg = load_config(config, [f"model.init_checkpoint={init_checkpoint}"])
    startup.start(cfg.parallel, seed=cfg.train.seed)
    arch = model_init.resolve_arch(cfg, run_data.load_run_tokenizer(cfg))
    rm = as_chunks(model_init.build_initial_model(cfg, arch, "rm"))[0]
    fresh = build_model_chunks(arch, task="rm", wrap_ddp=False)[0]
    saved_task = "rm" if read_checkpoint_meta(init_checkpoint)["task"] == "rm" else "policy"
    saved = build_model_chunks(arch, task=saved_task, wrap_ddp=False)
    load_model_checkpoint(saved, init_checkpoint)
    saved = saved[0]
    head = rm.output_layer.weight
    result = {
        "head_shape": list(head.shape),
        "head_is_fresh": torch.equal(head, fresh.output_layer.weight),
        "head_is_saved_row0": torch.equal(head, saved.output_layer.weight[:1]),
        "embedding_is_saved": torch.equal(rm.embedding.word_embeddings.weight, saved.embedding.word_embeddings.weight),
    }
    with open(result_path, "w") as f:
        json.dump(result, f)
