"""Commands: one thin module per command (parse, call the library, print). Nothing outside ``cli/`` imports it.

Each is an entry point (``rao-train``, ``rao-convert``, ...) and runs as ``python -m rao_megatron.cli.<name>``
(torchrun needs the ``-m`` form). The spellings before the move, ``python -m rao_megatron.<name>``, still
work: ``rao_megatron/__init__.py`` maps them here.
"""
