"""Generation: sample K responses per prompt with vLLM (GPU) or HF transformers (CPU / GPU), seeded per prompt."""

from .backends import BACKENDS, DTYPES, HFBackend, VLLMBackend, make_backend, resolve_backend, stop_token_ids
from .loop import generate_rows, iter_generated, load_done
from .sampling import SamplingConfig, prompt_seed

__all__ = ["BACKENDS", "DTYPES", "HFBackend", "SamplingConfig", "VLLMBackend", "generate_rows", "iter_generated",
           "load_done", "make_backend", "prompt_seed", "resolve_backend", "stop_token_ids"]
