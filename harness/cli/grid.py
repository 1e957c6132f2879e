"""Python API for clusters: one ``harness run`` job per router x seed through a submitit-style executor.

Not a sub-command: ``from harness.cli.grid import submit_grid`` (docs/distributed.md). It lives in the CLI
layer because each job *is* a ``harness run`` command line.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from . import main


def submit_grid(executor: Any, routers: Iterable[str], seeds: Iterable[int], store: str,
                args: Sequence[str] = (), store_mode: str = "bundles") -> list[Any]:
    """Submit one job per router x seed to a submitit-style executor.

    Each job runs ``harness run --routers R --seeds S --store STORE --store-mode MODE *args`` in the job's own
    process (``harness.cli.main``). With ``store_mode="bundles"`` (the default) a job writes only its runs'
    result bundles into the runs directory (``--runs-dir`` in ``args``, else ``runs/`` beside ``store``) and
    never opens the DuckDB file: DuckDB allows one writing process per file and relies on file locks, which
    cluster (NFS) filesystems do not reliably provide. When the jobs are done, ``harness import RUNS_DIR
    --store STORE`` (or :func:`import_grid`) brings every run in. ``store_mode="store"`` has every job write
    the store itself (one machine, a local disk: the store serialises the writers with lock retries).
    Returns the jobs (``job.result()`` is the exit code).

    Works with ``submitit.AutoExecutor`` (Slurm), ``LocalExecutor`` and ``DebugExecutor``.
    """
    if store_mode not in ("bundles", "store"):
        raise ValueError(f"store_mode must be 'bundles' or 'store', got {store_mode!r}")
    jobs = []
    for r in routers:
        for s in seeds:
            jobs.append(executor.submit(main, ["run", "--routers", r, "--seeds", str(s), "--store", str(store),
                                               "--store-mode", store_mode, *args]))
    return jobs


def import_grid(store: str, runs_dir: str | None = None, quiet: bool = True) -> int:
    """``harness import`` of a bundles grid's runs directory (default ``runs/`` beside ``store``) into ``store``;
    the exit code (0: every bundle imported or already there)."""
    from pathlib import Path

    runs = runs_dir or str(Path(store).parent / "runs")
    return main(["import", runs, "--store", str(store), *(["--quiet"] if quiet else [])])
