"""rao_megatron: RAO and preference-optimization losses for Megatron-Core."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

__version__ = "0.1.0"

#: commands that lived at the package root before ``cli/``; ``python -m rao_megatron.<name>`` still runs them
MOVED_COMMANDS = ("train", "convert", "annotate", "precompute_reference", "generate", "evaluate", "online", "demo")


class _MovedCommandFinder(importlib.abc.MetaPathFinder):
    """Resolves ``rao_megatron.<command>`` (the old spelling) to the file of ``rao_megatron.cli.<command>``."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in MOVED_COMMANDS:
            return None
        if os.environ.get("RANK", "0") == "0":
            print(f"note: {fullname} is now rao_megatron.cli.{name} (entry point rao-{name.replace('_', '-')})",
                  file=sys.stderr)
        return importlib.util.spec_from_file_location(fullname, Path(__file__).parent / "cli" / f"{name}.py")


if not any(isinstance(f, _MovedCommandFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedCommandFinder())
