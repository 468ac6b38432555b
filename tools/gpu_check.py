"""GPU acceptance run: everything the project promises on CUDA, checked in one command (<= 8 min on one H100/H200).

    python tools/gpu_check.py                        # every check; figures and logs in runs/gpu_check/
    python tools/gpu_check.py --dry-run              # list the checks (works without CUDA)
    python tools/gpu_check.py --only train,kernels --out runs/gpu_check_h200

``--help`` says the rest. The code is the package tools/gpucheck/ (its __init__ says where a new check goes);
this script is its entry point, and the one workers are started through (``--worker NAME``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# the repository root, so that `tools.gpucheck` (and `benchmarks`, which the kernels worker uses) import
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.gpucheck.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
