"""Python API for clusters: one ``harness run`` job per router x seed through a submitit-style executor.

Not a sub-command: ``from harness.cli.grid import submit_grid`` (docs/distributed.md). It lives in the CLI
layer because each job *is* a ``harness run`` command line.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from . import main


def submit_grid(executor: Any, routers: Iterable[str], seeds: Iterable[int], store: str,
                args: Sequence[str] = ()) -> list[Any]:
    """Submit one job per router x seed to a submitit-style executor; every job writes to ``store``.

    Each job runs ``harness run --routers R --seeds S --store STORE *args`` in the job's own
    process (``harness.cli.main``); the store serialises concurrent writers (short transactions,
    lock retries), so all runs land in one file. Returns the jobs (``job.result()`` is the exit code).

    Works with ``submitit.AutoExecutor`` (Slurm), ``LocalExecutor`` and ``DebugExecutor``.
    """
    jobs = []
    for r in routers:
        for s in seeds:
            jobs.append(executor.submit(main, ["run", "--routers", r, "--seeds", str(s), "--store", str(store),
                                               *args]))
    return jobs
