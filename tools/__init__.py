"""Developer tools run from the repository root (``python tools/<name>.py``); importable as ``tools.*`` for the tests.

They sit above the package: they may import any of rao_megatron (and ``benchmarks``), and nothing in
rao_megatron imports them (tests/unit/test_layering.py).
"""
