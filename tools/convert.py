"""HF <-> Megatron checkpoint conversion; same as ``python -m rao_megatron.convert`` (see docs/conversion.md).

    python tools/convert.py hf-to-megatron --hf DIR --out DIR [--tp N] [--pp M] [--dtype auto|fp32|bf16]
    python tools/convert.py megatron-to-hf --megatron DIR --out DIR [--dtype ...] [--max-shard-size 2GB]
    python tools/convert.py compare --hf DIR --megatron DIR [--tp N] [--pp M] [--prompts ...] [--atol 1e-3]
"""

import sys

from rao_megatron.convert import cli

if __name__ == "__main__":
    sys.exit(cli())
