"""Workers for the reward-model tests that look inside the model (run in forked gloo ranks)."""

from __future__ import annotations


def head_vs_policy_worker(config: str, init_checkpoint: str, result_path: str) -> None:
    """Build the RM as training does from a policy checkpoint; record whether its head is the policy's row 0."""
    import torch

    from rao_megatron.config import load_config
    from rao_megatron.training import setup
    from rao_megatron.training.checkpoint import load_model_checkpoint

    cfg = load_config(config, [f"model.init_checkpoint={init_checkpoint}"])
    setup.start(cfg)
    tokenizer = setup.load_run_tokenizer(cfg)
    hf_config = setup.resolve_hf_config(cfg, tokenizer)
    rm = setup.build_initial_model(cfg, hf_config, "rm")
    policy = setup.build_initial_model(cfg, hf_config, "policy")
    load_model_checkpoint(policy, init_checkpoint)
    head = rm[0].module.output_layer.weight
    vocab_row0 = policy[0].module.output_layer.weight[:1]
    with open(result_path, "w") as f:
        f.write("copied" if torch.allclose(head, vocab_row0) else "fresh")
