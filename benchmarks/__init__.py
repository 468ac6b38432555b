"""Benchmark scripts, run from the repository root as ``python benchmarks/<name>.py``.

Also a package, so that the tests and tools/gpu_check.py import them (``from benchmarks import logprobs``)
instead of loading files by path. Like tools/, they sit above rao_megatron: they may import any of it, and
rao_megatron never imports them (tests/unit/test_layering.py). Importing this package imports nothing.
"""
