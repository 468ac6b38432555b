"""Sampling backends: HF transformers ``generate`` (CPU / GPU) and the vLLM offline engine (GPU)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessorList
from transformers.generation import TemperatureLogitsWarper, TopPLogitsWarper

from rao_megatron.data.prompts import Prompt, prompt_token_ids
from rao_megatron.data.tokenize import end_of_turn_ids
from rao_megatron.data.tokenizer import load_tokenizer, pad_id

from .sampling import SamplingConfig, prompt_seed

BACKENDS = ("auto", "hf", "vllm")
DTYPES = ("auto", "float32", "bfloat16")


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and the chat template's end-of-turn token (``<|im_end|>`` for SmolLM2)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eot = end_of_turn_ids(tokenizer)
    return list(dict.fromkeys(ids + eot[:1]))


def resolve_backend(backend: str, *, have_model: bool = False) -> str:
    """``auto``: vLLM when CUDA and vllm are available (and no HF model object was passed), else HF."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        if backend == "vllm" and have_model:
            raise ValueError("a loaded HF model can only be used with backend='hf'")
        return backend

    if not have_model and torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "hf"


class _SeededSampler:
    """Logits processor: draws each row's next token with that row's own generator (exponential race).

    argmax(p / E) with E ~ Exp(1) i.i.d. is a draw from p. The chosen token becomes the only finite score,
    so greedy search takes it. Every row draws once per step whatever the batch, so a sample depends on its
    seed only, not on which prompts share its batch.
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        probs = torch.softmax(scores.float(), dim=-1)
        noise = torch.stack([torch.empty(scores.shape[-1]).exponential_(generator=g) for g in self.generators])
        picked = (probs / noise.to(probs.device)).argmax(dim=-1, keepdim=True)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picked, 0.0)


class HFBackend:
    """transformers ``generate``: left padding, one batch of prompts × K samples per call, stops at EOS / end-of-turn."""

    name = "hf"

    def __init__(self, model_dir: str | os.PathLike | None, *, model: Any = None, tokenizer: Any = None,
                 dtype: str = "auto", threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        if model is None and model_dir is None:
            raise ValueError("pass model_dir or a loaded model")
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir or model.name_or_path)
        if model is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            if dtype == "auto":
                dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device)
        self.model = model
        self.stop = stop_token_ids(self.tokenizer)
        self.pad = pad_id(self.tokenizer, default=self.stop[0] if self.stop else None)  # eos is stop[0] where set

    def generate(self, prompts: Sequence[Prompt], cfg: SamplingConfig) -> list[list[str]]:
        """``cfg.n`` responses for each prompt."""
        copies = 1 if cfg.greedy else cfg.n
        ids = [x for x in prompt_token_ids(self.tokenizer, prompts) for _ in range(copies)]
        longest = max(map(len, ids))
        device = self.model.device
        input_ids = torch.tensor([[self.pad] * (longest - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (longest - len(x)) + [1] * len(x) for x in ids], device=device)
        processors = LogitsProcessorList()
        if not cfg.greedy:
            processors.append(TemperatureLogitsWarper(cfg.temperature))
            if cfg.top_p < 1:
                processors.append(TopPLogitsWarper(cfg.top_p))
            processors.append(_SeededSampler([prompt_seed(cfg.seed, p.id, j) for p in prompts for j in range(copies)]))
        gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1,
                                   eos_token_id=self.stop, pad_token_id=self.pad)
        was_training = self.model.training  # a caller's model (GRAO online rounds) goes back as it came
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen_cfg,
                                          logits_processor=processors)
        finally:
            self.model.train(was_training)
        texts = []
        for seq in out[:, longest:].tolist():
            cut = next((i for i, t in enumerate(seq) if t in self.stop), len(seq))
            texts.append(self.tokenizer.decode(seq[:cut], skip_special_tokens=True))
        return [texts[i * copies:(i + 1) * copies] * (cfg.n // copies) for i in range(len(prompts))]


class VLLMBackend:
    """vLLM offline engine; the chat template is applied with the HF tokenizer and token ids are passed in."""

    name = "vllm"

    def __init__(self, model_dir: str | os.PathLike, *, seed: int = 0, dtype: str = "auto",
                 tokenizer: Any = None, **engine_kwargs: Any) -> None:
        from vllm import LLM  # optional: vllm, only for this backend

        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
        self.llm = LLM(model=str(model_dir), seed=seed, dtype=dtype, **engine_kwargs)
        self.stop = stop_token_ids(self.tokenizer)

    def generate(self, prompts: Sequence[Prompt], cfg: SamplingConfig) -> list[list[str]]:
        """``cfg.n`` responses for each prompt (one seeded request per prompt)."""
        from vllm import SamplingParams  # optional: vllm, only for this backend

        copies = 1 if cfg.greedy else cfg.n
        params = [SamplingParams(n=copies, temperature=cfg.temperature, top_p=1.0 if cfg.greedy else cfg.top_p,
                                 max_tokens=cfg.max_new_tokens, seed=prompt_seed(cfg.seed, p.id),
                                 stop_token_ids=self.stop, skip_special_tokens=True) for p in prompts]
        requests = [{"prompt_token_ids": ids} for ids in prompt_token_ids(self.tokenizer, prompts)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [[c.text for c in o.outputs] * (cfg.n // copies) for o in outputs]


def make_backend(backend: str, model_dir: str | os.PathLike | None, *, seed: int = 0, dtype: str = "auto",
                 model: Any = None, tokenizer: Any = None, threads: int | None = None) -> HFBackend | VLLMBackend:
    """Load the model for ``backend`` (``auto`` resolved here)."""
    backend = resolve_backend(backend, have_model=model is not None)
    if backend == "vllm":
        if model_dir is None:
            raise ValueError("the vLLM backend needs model_dir")
        return VLLMBackend(model_dir, seed=seed, dtype=dtype, tokenizer=tokenizer)
    return HFBackend(model_dir, model=model, tokenizer=tokenizer, dtype=dtype, threads=threads)
