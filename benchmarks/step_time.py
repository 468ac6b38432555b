"""Step time and tokens/s of RAO training with a cached vs an on-the-fly reference, side by side.

    python benchmarks/step_time.py [--steps 8] [--hidden 256] [--layers 4]

One process, CPU (gloo), a small random Llama (hidden/layers configurable) and the tiny letter task.
The on-the-fly reference runs an extra forward pass of a frozen model per step and holds a second copy
of the weights; the cache replaces both with a table lookup. Prints both rows and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--order", default="on_the_fly,cached", help="measurement order (check it does not matter)")
    args = ap.parse_args()

    import torch

    from rao_megatron.cli.precompute_reference import main as precompute
    from rao_megatron.config import load_config
    from rao_megatron.data import load_tokenizer
    from rao_megatron.models.hf_config import tiny_hf_config
    from rao_megatron.training.loop import Trainer

    torch.set_num_threads(2)
    tok = load_tokenizer(None)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        cfg_hf = tiny_hf_config("llama", vocab_size=len(tok), hidden_size=args.hidden,
                                intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                                num_attention_heads=8, num_key_value_heads=4)
        (model_dir / "config.json").write_text(json.dumps(cfg_hf.to_dict()))
        data = Path(tmp) / "groups.jsonl"
        data.write_text((ROOT / "examples/data/tiny_groups.jsonl").read_text())
        from rao_megatron.data import TINY_TOKENIZER_DIR

        common = [f"model.hf_config={model_dir}", "model.preset=null", f"model.tokenizer={TINY_TOKENIZER_DIR}", f"data.train_path={data}",
                  f"train.steps={args.steps}", "train.eval_every=0", "checkpoint.save_at_end=false",
                  "data.eval_fraction=0", "train.global_batch_groups=8", "data.groups_per_micro_batch=4"]
        config = ROOT / "examples/configs/rao_tiny.yaml"
        precompute(argparse.Namespace(config=str(config), overrides=common))
        rows = {}
        # a throw-away run first: the first trainer of a process is several times slower per step (allocator
        # and thread-pool warm-up), which would otherwise favour whichever mode runs second
        for mode in ("warmup", *args.order.split(",")):
            ref = "cached" if mode == "warmup" else mode
            steps = 3 if mode == "warmup" else args.steps
            cfg = load_config(config, [*common, f"train.reference={ref}", f"train.output_dir={tmp}/{mode}",
                                       f"train.steps={steps}"])
            trainer = Trainer(cfg)
            records = [trainer.train_step() for _ in range(steps)]
            del trainer
            if mode != "warmup":
                timed = records[1:]
                rows[mode] = (statistics.median(r["step_time_s"] for r in timed),
                              statistics.median(r["tokens_per_s"] for r in timed))
    print(f"model: Llama hidden={args.hidden} layers={args.layers}, {args.steps} steps, 8 groups x 4 responses/step, CPU")
    print(f"{'reference':<12} {'step time (s)':>14} {'tokens/s':>10}")
    for mode, (t, tps) in rows.items():
        print(f"{mode:<12} {t:>14.3f} {tps:>10.0f}")
    print(f"cached / on_the_fly: step time x{rows['cached'][0] / rows['on_the_fly'][0]:.2f}, "
          f"tokens/s x{rows['cached'][1] / rows['on_the_fly'][1]:.2f}")


if __name__ == "__main__":
    main()
