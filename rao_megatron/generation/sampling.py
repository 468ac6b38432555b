"""How responses are sampled: the settings recorded in every output row, and the per-prompt seeds."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from rao_megatron.data.prompts import id_key


@dataclass
class SamplingConfig:
    """How responses are sampled; recorded in every output row (``sampling``) and checked on resume."""

    n: int = 4                       # responses per prompt
    max_new_tokens: int = 64         # response length limit in tokens
    temperature: float = 0.7         # 0: greedy (one answer, copied n times)
    top_p: float = 0.95              # nucleus sampling mass (1: off)
    seed: int = 0                    # with the prompt id, seeds each prompt's samples

    def check(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"--n and --max-new-tokens must be >= 1, got {self.n} and {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"--temperature must be >= 0 and --top-p in (0, 1], got {self.temperature}, {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def record(self, backend: str, model: str) -> dict[str, Any]:
        """The ``sampling`` field of an output row."""
        return {"n": self.n, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed, "backend": backend, "model": model}


def prompt_seed(seed: int, prompt_id: Any, sample: int | None = None) -> int:
    """A 63-bit seed for one prompt (vLLM request) or one sample of it (HF), independent of batching."""
    text = f"{seed}\x00{id_key(prompt_id)}" + ("" if sample is None else f"\x00{sample}")
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)
