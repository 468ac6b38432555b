"""One module per check of the GPU acceptance run: its check function, its judgements, its ``CHECK`` and its
workers (``WORKERS``: name -> function, run in a fresh process). tools/gpucheck/cli.py lists the modules in
the order they run."""
