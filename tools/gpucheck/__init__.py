"""The GPU acceptance run behind ``python tools/gpu_check.py`` (the entry script users and docs call).

    harness.py    Row, Check, Context (runs a check's commands: logs, time limits, workers), Results (a worker's
                  JSON file), DEPS, COMMANDS, the environment of every subprocess, gate / run_check
    judge.py      judgements several checks share (training curves, loss comparisons, safetensors bits)
    workers.py    what several workers share (one rank's groups, per-token log-probs, TE detection)
    checks/       one module per check: check_<name>(ctx) -> rows, its judge_* functions, CHECK, its workers
    probe.py      the environment probe (CUDA, device, importable packages), run first in a fresh process
    report.py     the printed rows, gpu_check.json, the exit code
    cli.py        the command line, CHECK_MODULES (the run order), CHECKS and WORKERS

A new row of an existing check: append a ``Row("<check>/<row>", verdict, reason, seconds, figures)`` in its
``check_<name>``; if it judges measured figures, a ``judge_*`` function beside it and a unit test in
tests/unit/test_gpu_check.py. A new check: a module ``checks/<name>.py`` with ``check_<name>``, ``CHECK =
Check(name, description, check_<name>, timeout_s, needs, gpus)`` and, if it runs code in a fresh process,
``WORKERS = {"<worker>": worker_fn}`` started by ``ctx.worker("<worker>", **args)``; add the module to
``CHECK_MODULES`` in cli.py and its name to EXPECTED_CHECKS in tests/unit/test_gpu_check.py.

Only the workers import torch and rao_megatron, inside their functions: ``--dry-run`` imports none of them.
"""
