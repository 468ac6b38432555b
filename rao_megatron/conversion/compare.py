"""Compare an HF model with a Megatron checkpoint: same token ids through both in fp32, logits side by side.

The Megatron side runs first, on its own ranks (TP x PP forked CPU processes), and hands its logits back
through a file; only then is the HF model loaded, so at most one copy of the weights exists at a time.
A LoRA checkpoint is compared as the model it trains: its base with the adapters merged in (as
``megatron-to-hf --merge-lora`` exports it).
Sequences are right-padded and attention is causal, so the real positions see no padding.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rao_megatron.conversion.convert import build_chunks, run_ranks
from rao_megatron.conversion.hf_io import TOKENIZER_FILES, ConversionError, read_hf_config
from rao_megatron.conversion.validate import check_layout, config_for_task, conversion_world_size
from rao_megatron.data.tokenizer import pad_id
from rao_megatron.models.checkpoint import read_checkpoint_meta, resolve_checkpoint
from rao_megatron.models.hf_config import ModelArch
from rao_megatron.parallel.state import destroy_model_parallel, initialize_model_parallel, is_last_stage
from rao_megatron.training.engine import forward_backward
from rao_megatron.training.model_init import load_weights

DEFAULT_PROMPTS = ("What is the capital of France?", "Write a haiku about autumn leaves.",
                   "Explain in one sentence why the sky is blue.")


@dataclass(frozen=True)
class Comparison:
    """Agreement of two ``[B, S, V]`` outputs over the real (unpadded) positions."""

    max_abs_diff: float
    min_cosine: float
    mean_cosine: float
    argmax_agree: int
    positions: int
    source: str

    def within(self, atol: float) -> bool:
        return self.max_abs_diff <= atol

    def report(self, atol: float) -> str:
        verdict = "OK" if self.within(atol) else f"FAIL: max abs diff {self.max_abs_diff:.3e} > atol {atol:.1e}"
        return "\n".join([
            f"compared {self.positions} positions ({self.source})",
            f"max |logits diff|   {self.max_abs_diff:.3e}  (atol {atol:.1e})",
            f"cosine similarity   min {self.min_cosine:.7f}  mean {self.mean_cosine:.7f}",
            f"argmax agreement    {self.argmax_agree}/{self.positions} "
            f"({100.0 * self.argmax_agree / max(1, self.positions):.2f}%)",
            verdict])


def compare_outputs(megatron: torch.Tensor, hf: torch.Tensor, lengths: torch.Tensor, source: str = "") -> Comparison:
    """Statistics of ``megatron[B, S, V]`` vs ``hf[B, S, V]`` at positions ``< lengths[b]``."""
    if megatron.shape != hf.shape:
        raise ConversionError(f"output shapes differ: Megatron {tuple(megatron.shape)} vs HF {tuple(hf.shape)}")
    mask = torch.arange(hf.shape[1]) < lengths[:, None]
    a, b = megatron[mask].double(), hf[mask].double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return Comparison(max_abs_diff=float((a - b).abs().max()), min_cosine=float(cos.min()),
                      mean_cosine=float(cos.mean()), argmax_agree=int((a.argmax(-1) == b.argmax(-1)).sum()),
                      positions=int(mask.sum()), source=source)


def load_prompt_tokenizer(*dirs: str | os.PathLike | None) -> Any:
    """The tokenizer of the first directory that has one, or None."""
    for d in dirs:
        if d is not None and any((Path(d) / n).is_file() for n in TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    return None


def prompt_token_ids(tokenizer: Any, prompts: list[str] | tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-templated (when the tokenizer has a template) prompts -> right-padded ``ids[B, S]``, ``lengths[B]``."""
    rows = []
    for p in prompts:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True)
            rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            rows.append(tokenizer(p)["input_ids"])
    pad = pad_id(tokenizer, default=0)
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, lengths


def _output_step(task: str, data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    """Forward step: logits (TP-gathered) or RM values of one micro-batch, returned as the 'loss' output."""
    mb = next(data_iterator)
    out = model(mb["tokens"], mb["position_ids"], None)

    def collect(o: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if task != "rm":
            o = gather_from_tensor_model_parallel_region(o)  # vocab shards -> [B, S, V_pad]
        return o.sum() * 0, {"out": o.detach()}

    return out, collect


def _megatron_outputs_worker(checkpoint: str, arch: ModelArch, task: str, ids: torch.Tensor, tp: int,
                             pp: int, out_file: str, ep: int = 1, etp: int | None = None) -> None:
    initialize_model_parallel(tp=tp, pp=pp, ep=ep, etp=etp)
    chunks = build_chunks(arch, task, torch.float32)
    load_weights(chunks, checkpoint, arch, task)  # a LoRA checkpoint: its base with the adapters merged in
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0)
    microbatches = [{"tokens": ids[i: i + 1], "position_ids": position_ids} for i in range(ids.shape[0])]
    outputs = forward_backward(chunks, functools.partial(_output_step, task), microbatches, forward_only=True)
    if is_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and \
            ps.get_data_parallel_rank() == 0:  # DP replicas (ranks for EP) compute the same
        torch.save(torch.cat([o["out"] for o in outputs]), out_file)
    destroy_model_parallel()


def megatron_outputs(checkpoint: str | os.PathLike, ids: torch.Tensor, *, tp: int = 1, pp: int = 1, ep: int = 1,
                     etp: int | None = None) -> torch.Tensor:
    """fp32 logits ``[B, S, V]`` (padding columns dropped), or RM values ``[B, S, 1]``, at layout TP x PP (x EP)."""
    checkpoint = resolve_checkpoint(checkpoint)
    meta = read_checkpoint_meta(checkpoint)
    task = "rm" if meta.get("task") == "rm" else "policy"
    arch = check_layout(config_for_task(meta["hf_config"], task), tp, pp, ep, etp)
    with tempfile.TemporaryDirectory(prefix="rao-compare-") as tmp:
        out_file = os.path.join(tmp, "outputs.pt")
        run_ranks(_megatron_outputs_worker, conversion_world_size(tp, pp, ep, etp), str(Path(checkpoint).resolve()),
                  arch, task, ids, tp, pp, out_file, ep, etp)
        out = torch.load(out_file)
    return out if task == "rm" else out[..., : arch.vocab_size]


@torch.no_grad()
def hf_outputs(hf_dir: str | os.PathLike, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[B, S, V]`` of an HF causal LM, or per-position scores ``[B, S, 1]`` of a classifier."""
    archs = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True).architectures or []
    rm = any(a.endswith("ForSequenceClassification") for a in archs)
    cls = AutoModelForSequenceClassification if rm else AutoModelForCausalLM
    model = cls.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()
    if not rm:
        return model(ids).logits
    # the classifier pools at the last token; score every position to compare as much as the LM case
    hidden = getattr(model, model.base_model_prefix)(ids).last_hidden_state
    return model.score(hidden)


def compare_checkpoints(hf_dir: str | os.PathLike, checkpoint: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                        prompts: list[str] | tuple[str, ...] | None = None,
                        ids: torch.Tensor | None = None, ep: int = 1, etp: int | None = None) -> Comparison:
    """Run the same token ids through the HF model and the Megatron checkpoint (fp32) and compare.

    Token ids: ``ids`` if given, else ``prompts`` (default ``DEFAULT_PROMPTS``) through the tokenizer of
    the HF directory or the checkpoint; without any tokenizer, 4 x 32 seeded random ids.
    """
    lengths = None
    source = "given token ids"
    if ids is None:
        tokenizer = load_prompt_tokenizer(hf_dir, resolve_checkpoint(checkpoint) / "tokenizer")
        if tokenizer is not None:
            ids, lengths = prompt_token_ids(tokenizer, list(prompts or DEFAULT_PROMPTS))
            source = f"{len(ids)} prompts"
        elif prompts:
            raise ConversionError(f"--prompts needs a tokenizer; neither {hf_dir} nor the checkpoint has one")
        else:
            vocab = read_hf_config(hf_dir)["vocab_size"]
            ids = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0))
            source = "4 random sequences (no tokenizer)"
    if lengths is None:
        lengths = torch.full((ids.shape[0],), ids.shape[1])
    mega = megatron_outputs(checkpoint, ids, tp=tp, pp=pp, ep=ep, etp=etp)
    ref = hf_outputs(hf_dir, ids)
    layout = f"TP{tp} PP{pp}" + (f" EP{ep} ETP{tp if etp is None else etp}" if ep > 1 or etp not in (None, tp) else "")
    return compare_outputs(mega, ref, lengths, f"{source}, Megatron at {layout}, fp32")
