"""HF checkpoint files: lazy safetensors reading, shard-by-shard writing, config / tokenizer copying, staged output.

Nothing here holds a whole model: ``LazyHFStateDict`` reads one tensor per lookup from memory-mapped
safetensors files, and ``ShardedSafetensorsWriter`` flushes each shard as soon as it is full.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rao_megatron.config import guarded_write

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: files that make up an HF tokenizer (whichever of them a model has)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


class ConversionError(ValueError):
    """A user error in a conversion (bad checkpoint, layout or output path); the CLI prints it on one line."""


def parse_size(text: str | int) -> int:
    """Bytes from ``"2GB"``, ``"500MB"``, ``"200KB"`` or a plain number (decimal units, as transformers)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise ConversionError(f"--max-shard-size {text!r}: expected a size such as 2GB, 500MB or 200KB")
    unit = m.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base**power)


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of an HF model directory as a dict."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise FileNotFoundError(f"HF model directory not found: {hf_dir}")
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json (not an HF model directory)")
    return json.loads(path.read_text())


def open_safetensors(path: str | os.PathLike) -> Any:
    """``safe_open(path)``; a file that is missing, truncated or not safetensors at all is a one-line
    :class:`ConversionError` naming it (safetensors' own error names no file)."""
    if not Path(path).is_file():
        raise ConversionError(f"{path}: weight file missing (named by {INDEX_FILE}?)")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - SafetensorError (header too small, incomplete metadata), OSError
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConversionError(f"{path}: not a readable safetensors file ({reason}); an interrupted download? "
                              "fetch the file again") from None


def _weight_map(hf_dir: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the index or the single-file checkpoint."""
    if (hf_dir / INDEX_FILE).is_file():
        try:
            index = json.loads((hf_dir / INDEX_FILE).read_text(encoding="utf-8"))
            return {str(k): str(v) for k, v in index["weight_map"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConversionError(f"{hf_dir / INDEX_FILE}: not a safetensors index (expected JSON with a "
                                  f"'weight_map' object; {type(e).__name__}: {e})") from None
    files = [hf_dir / SINGLE_FILE] if (hf_dir / SINGLE_FILE).is_file() else sorted(hf_dir.glob("*.safetensors"))
    if not files:
        found = "pytorch_model.bin" if any(hf_dir.glob("pytorch_model*.bin")) else "no weight files"
        raise FileNotFoundError(f"{hf_dir} has no *.safetensors weights ({found}); re-save the model "
                                "with save_pretrained(..., safe_serialization=True)")
    weight_map: dict[str, str] = {}
    for f in files:
        with open_safetensors(f) as st:
            weight_map.update({k: f.name for k in st.keys()})
    return weight_map


class LazyHFStateDict(Mapping[str, torch.Tensor]):
    """Read-only mapping over the safetensors of an HF directory; each lookup reads one tensor from disk.

    Files are memory-mapped and opened on first use, so a rank touches only the tensors it asks for.
    ``on_read`` (if set) is called with each name read, e.g. to advance a progress bar.
    """

    def __init__(self, hf_dir: str | os.PathLike, on_read: Any = None) -> None:
        self.hf_dir = Path(hf_dir)
        self.weight_map = _weight_map(self.hf_dir)
        self.on_read = on_read
        self.reads: list[str] = []
        self._handles: dict[str, Any] = {}

    def _file(self, name: str) -> Any:
        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = open_safetensors(self.hf_dir / fname)
        return self._handles[fname]

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._file(name).get_tensor(name)
        self.reads.append(name)
        if self.on_read is not None:
            self.on_read(name)
        return tensor

    def __contains__(self, name: object) -> bool:
        return name in self.weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the file headers only (no data read)."""
        return {name: tuple(self._file(name).get_slice(name).get_shape()) for name in self.weight_map}


class ShardedSafetensorsWriter:
    """Write tensors into ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes``.

    A shard is written and dropped from memory as soon as the next tensor would overflow it; names are
    fixed up at ``close()`` (one shard -> ``model.safetensors`` and no index, as transformers does).
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Queue one tensor, cast to ``dtype`` (always copied: views of one parameter must not share storage)."""
        if name in self._pending or any(name in s for s in self._shards):
            raise ConversionError(f"tensor {name!r} written twice")
        dtype = dtype or tensor.dtype
        nbytes = tensor.numel() * torch.empty(0, dtype=dtype).element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu", dtype=dtype, memory_format=torch.contiguous_format,
                                                 copy=True)
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        index = len(self._shards)
        shard = self.out_dir / f"shard-{index:05d}.partial"
        with guarded_write(shard, "HF weight shard", partial=shard):  # a full disk: one line naming the file
            save_file(self._pending, str(shard), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, name the files, write the index when sharded; returns the weight files."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        umask = os.umask(0)
        os.umask(umask)
        for i, name in enumerate(names):
            os.replace(self.out_dir / f"shard-{i:05d}.partial", self.out_dir / name)
            os.chmod(self.out_dir / name, 0o666 & ~umask)  # safetensors creates 0600 files
        if n > 1:
            weight_map = {t: name for name, tensors in zip(names, self._shards) for t in tensors}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [self.out_dir / name for name in names]


def hf_dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the config.json spelling)."""
    return _HF_DTYPE_NAMES[dtype]


def config_dtype(cfg: dict[str, Any]) -> torch.dtype:
    """The dtype an HF config declares (bf16 if so, else fp32: fp16 weights convert losslessly to fp32)."""
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return torch.bfloat16 if name.endswith("bfloat16") else torch.float32


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_tokenizer_files(src_dir: str | os.PathLike | None, dst_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files found in ``src_dir`` to ``dst_dir``; returns their names ([] if none)."""
    if src_dir is None or not Path(src_dir).is_dir():
        return []
    names = [n for n in TOKENIZER_FILES if (Path(src_dir) / n).is_file()]
    if names:
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copyfile(Path(src_dir) / n, Path(dst_dir) / n)
    return names


def check_output_dir(out: str | os.PathLike) -> Path:
    """``out`` as a Path if it does not exist or is an empty directory; ConversionError otherwise."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"output directory {out} is not empty; choose a new path or remove it")
    return out


@contextmanager
def staged_output(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a path to write the output to; it becomes ``out`` only if the block succeeds.

    The staging directory is a sibling of ``out`` (same filesystem, so the final rename is atomic) and
    is removed on failure, so a failed conversion leaves nothing behind.
    """
    out = check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        target = staging / out.name
        yield target
        if not target.is_dir():
            raise ConversionError(f"conversion wrote nothing to {target}")
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(target, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
