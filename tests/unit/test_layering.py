"""Layers point one way (docs/architecture.md): a lower folder never imports a higher one.

Read from the source with ``ast`` (no imports executed), so a back-edge anywhere -- top level or inside a
function -- fails here with the file, line and the edge it adds. tools/ and benchmarks/ sit above the package:
they may import any of it (cli/ included), and nothing in rao_megatron imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "rao_megatron"

#: folder (or root module) -> layer; a module may import its own folder and lower layers only
LAYERS: dict[str, int] = {
    "losses": 0, "logprobs": 0,
    "parallel": 1, "models": 1, "data": 1, "tasks": 1, "config": 1,
    "training": 2,
    "conversion": 3, "rewards": 3, "generation": 3,
    "cli": 4,
}
#: the bottom layer is stricter: losses/ and logprobs/ use each other's public API only (the package)
BOTTOM_PUBLIC = {"losses": {"rao_megatron.logprobs"}, "logprobs": {"rao_megatron.losses"}}
#: layer-3 peers do not import each other
PEERS_APART = {"conversion", "rewards", "generation"}
#: folders above the package (scripts, importable as packages for the tests): they use it, it never uses them
ABOVE = ("tools", "benchmarks")


def _owner(path: Path, package: Path) -> str:
    rel = path.relative_to(package)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path, package_dir: Path, tops: tuple[str, ...] = ("rao_megatron",)) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in ``path`` (in the package ``package_dir``) of the top-level
    packages ``tops``."""
    module = ".".join((package_dir.name, *path.relative_to(package_dir).with_suffix("").parts))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return [(line, name) for line, name in found if name.split(".")[0] in tops]


def back_edges(package: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        owner = _owner(path, package)
        if owner == "__init__":
            continue
        if owner not in LAYERS:
            problems.append(f"{path.relative_to(package.parent)}: '{owner}' has no layer (add it to LAYERS and "
                            "docs/architecture.md, or move it into a folder)")
            continue
        for line, name in _imports(path, package, ("rao_megatron", *ABOVE)):
            parts = name.split(".")
            if parts[0] in ABOVE:
                problems.append(f"{path.relative_to(package.parent)}:{line} imports {name}: {parts[0]}/ sits above "
                                "the package, which never imports it")
                continue
            if len(parts) < 2:
                continue
            target = parts[1]
            where = f"{path.relative_to(package.parent)}:{line} imports {name}"
            if target == owner:
                continue
            if target not in LAYERS:
                problems.append(f"{where}: unknown target '{target}'")
            elif LAYERS[target] > LAYERS[owner]:
                problems.append(f"{where}: {owner} (layer {LAYERS[owner]}) -> {target} (layer {LAYERS[target]})")
            elif owner in BOTTOM_PUBLIC and name not in BOTTOM_PUBLIC[owner]:
                problems.append(f"{where}: {owner}/ may only use the public API of {BOTTOM_PUBLIC[owner]}")
            elif owner in PEERS_APART and target in PEERS_APART:
                problems.append(f"{where}: {owner}/ and {target}/ are peers and stay apart")
    return problems


def test_layers_point_one_way() -> None:
    problems = back_edges()
    assert not problems, "\n".join(problems)


def above_problems(repo: Path = REPO) -> list[str]:
    """tools/ and benchmarks/ may import any layer of the package: each import must name one that exists."""
    problems = []
    for top in ABOVE:
        for path in sorted((repo / top).rglob("*.py")):
            for line, name in _imports(path, repo / top):
                parts = name.split(".")
                if len(parts) > 1 and parts[1] not in LAYERS:
                    problems.append(f"{path.relative_to(repo)}:{line} imports {name}: unknown target '{parts[1]}'")
    return problems


def test_tools_and_benchmarks_import_known_layers() -> None:
    problems = above_problems()
    assert not problems, "\n".join(problems)


def module_cycles(package: Path = PACKAGE) -> list[list[str]]:
    """Groups of the package's modules that import each other, directly or around a loop (any import, top
    level or inside a function; ``from pkg import module`` counts as importing the module). Packages'
    ``__init__`` files are left out: importing a submodule runs them anyway."""
    paths = {".".join((package.name, *p.relative_to(package).with_suffix("").parts)): p
             for p in sorted(package.rglob("*.py")) if p.name != "__init__.py"}
    edges: dict[str, set[str]] = {}
    for name, path in paths.items():
        edges[name] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(name.split(".")[: -node.level] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in paths and t != name}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reachable = {name: reach(name) for name in paths}
    groups = {frozenset(n for n in paths if n in reachable[m] and m in reachable[n]) for m in paths}
    return sorted(sorted(g) for g in groups if len(g) > 1)


def test_no_import_cycles() -> None:
    """A lower module never imports the one above it, not even inside a function (parallel.state is Megatron's
    groups, parallel.startup the process start-up that uses them)."""
    cycles = module_cycles()
    assert not cycles, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_an_import_cycle_is_caught(tmp_path) -> None:
    import shutil

    copy = tmp_path / "rao_megatron"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    target = copy / "parallel" / "state.py"
    target.write_text(target.read_text() + "\n\ndef _start():\n    from rao_megatron.parallel import startup\n")
    assert ["rao_megatron.parallel.startup", "rao_megatron.parallel.state"] in module_cycles(copy)


def test_package_root_holds_folders_and_config_only() -> None:
    stray = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "config.py"))
    assert not stray, f"modules at the package root: {stray}; commands go to cli/, library code to its folder"


@pytest.mark.parametrize("edge", [
    ("training/loop.py", "from rao_megatron.rewards.scorers import ModelScorer\n"),
    ("models/provider.py", "from rao_megatron.training import engine\n"),
    ("losses/rao.py", "from rao_megatron.logprobs.chunked import ChunkedLogprobs\n"),
    ("data/collate.py", "import rao_megatron.cli.train\n"),
    ("cli/train.py", "from tools.gpucheck import harness\n"),
    ("training/engine.py", "def _timing():\n    from benchmarks.logprobs import cuda_measure\n"),
])
def test_a_back_edge_is_caught(tmp_path, edge) -> None:
    """The checker itself: copy the package, add one back-edge, and it must be reported."""
    import shutil

    copy = tmp_path / "rao_megatron"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    rel, line = edge
    target = copy / rel
    target.write_text(target.read_text() + "\n" + line)
    found = back_edges(copy)
    assert any(rel in p for p in found), found
