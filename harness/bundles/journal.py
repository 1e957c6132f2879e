"""A run's rows kept as a result bundle in its run directory, behind the store's own interface.

:class:`BundleStore` (``harness run --store-mode bundles``) is what ``train_run``, ``skip_finished``,
``--restart``, ``--jobs`` workers and lm-eval after pretraining write to instead of the DuckDB file; it never
opens a database file. Each write is the :class:`~harness.store.Store` method itself, run on an in-memory DuckDB
connection holding the run's rows (loaded from its bundle), after which the run's bundle is rewritten atomically:
the same SQL, the same rows, one bundle per write as one transaction per write in the store. A run's bundle
exists from ``start_run`` on (status ``running``), is rewritten at each checkpoint's progress write (so
``--resume`` after kill -9 finds it), and holds the final status (finished, diverged, failed, interrupted).

:class:`RecordingStore` (the default ``--store-mode store``) writes the DuckDB store as before and mirrors
every write into the run's bundle too, so every run leaves a bundle beside its checkpoint.

Bundles live at ``<runs dir>/<run key>/bundles/<run id>/`` (run key = ``<suite>-<router>-<hash>-s<seed>``).
"""
from __future__ import annotations

import contextlib
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator

import duckdb
import pyarrow as pa

from ..store import Store, StoreError, is_interrupt, now
from .format import TABLES, BundleError, read_bundle, run_tables, to_table, write_bundle

BUNDLES = "bundles"  # the folder of a run directory that holds its runs' bundles


def run_key_of(run_id: str) -> str:
    """``<suite>-<router>-<hash>-s<seed>`` of a run id made by the harness (the run key plus ``-<6 hex>``)."""
    return run_id.rsplit("-", 1)[0]


def bundle_path(runs_dir: str | os.PathLike[str], run_id: str) -> Path:
    return Path(runs_dir) / run_key_of(run_id) / BUNDLES / run_id


class BundleStore(Store):
    """The store interface, kept as one bundle per run under ``runs_dir``; never opens a database file."""

    mode = "bundles"

    def __init__(self, runs_dir: str | os.PathLike[str], lock_timeout: float = 300.0) -> None:
        super().__init__(Path(runs_dir), lock_timeout)
        self.runs_dir = Path(runs_dir)
        self._journal: dict[str, dict[str, pa.Table]] = {}  # run id -> its tables (what its bundle holds)
        self._active: list[str] | None = None  # the runs a write works on (None: every run in the journal)
        self._machine: tuple | None = None

    def with_timeout(self, lock_timeout: float) -> "BundleStore":
        return self  # no lock to wait for

    # -- the journal ------------------------------------------------------------------------
    def _load(self, run_id: str) -> None:
        if run_id not in self._journal:
            p = bundle_path(self.runs_dir, run_id)
            if not (p / "manifest.json").exists():
                raise BundleError(f"no result bundle for run {run_id} at {p}")
            self._journal[run_id] = read_bundle(p).tables

    @contextlib.contextmanager
    def _on(self, run_ids: Iterable[str], new: bool = False) -> Iterator[None]:
        ids = list(run_ids)
        for rid in ids:
            if new:
                self._journal[rid] = {t: to_table(t, ()) for t in TABLES}
                if self._machine is not None:
                    self._journal[rid]["machines"] = to_table("machines", [self._machine])
            else:
                self._load(rid)
        self._active = ids
        try:
            yield
        finally:
            self._active = None

    @contextlib.contextmanager
    def writer(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """An in-memory store holding the active runs' rows; on success each changed run's bundle is rewritten.

        A Ctrl-C or SIGTERM that lands inside a DuckDB call comes out as DuckDB's own error; it is turned back
        into an interrupt (as :meth:`Store.writer` does), so the run is recorded interrupted, not failed."""
        try:
            with self._write() as con:
                yield con
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            if is_interrupt(exc):
                raise KeyboardInterrupt(f"interrupted during a write of result bundles under {self.runs_dir}") \
                    from exc
            raise

    @contextlib.contextmanager
    def _write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        ids = list(self._journal) if self._active is None else list(self._active)
        con = duckdb.connect(":memory:")
        try:
            self._init_schema(con)
            for rid in ids:
                for t, tbl in self._journal[rid].items():
                    cols = ", ".join(tbl.column_names)
                    con.register("_bundle_rows", tbl)
                    con.execute(f"INSERT INTO {t} ({cols}) SELECT {cols} FROM _bundle_rows"
                                + (" ON CONFLICT DO NOTHING" if t == "machines" else ""))
                    con.unregister("_bundle_rows")
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise
            for rid in ids:
                got = _run_tables(con, rid)
                if got is None:
                    continue
                old = self._journal.get(rid)
                if old is None or any(not got[t].equals(old[t]) for t in TABLES) or \
                        not (bundle_path(self.runs_dir, rid) / "manifest.json").exists():
                    write_bundle(bundle_path(self.runs_dir, rid), got)
                    self._journal[rid] = got
        finally:
            con.close()

    def check_readable(self) -> None:
        return None

    # -- writes: the store's own methods on the run's rows ----------------------------------------
    def register_machine(self, info: dict[str, Any]) -> None:
        self._machine = (info["machine_id"], info["hostname"], info["cpu"], info["threads"], info["gpu"],
                         info["platform"], info["python"], now())

    def start_run(self, row: dict[str, Any]) -> None:
        with self._on([row["run_id"]], new=True):
            super().start_run(row)

    def update_progress(self, run_id: str, step: int, curves=()) -> None:  # noqa: ANN001
        with self._on([run_id]):
            super().update_progress(run_id, step, curves)

    def truncate_after(self, run_id: str, step: int) -> None:
        with self._on([run_id]):
            super().truncate_after(run_id, step)

    def finish_run(self, run_id: str, status: str, step: int, *args: Any, **kw: Any) -> None:
        with self._on([run_id]):
            super().finish_run(run_id, status, step, *args, **kw)

    def mark_interrupted(self, run_id: str, step: int, reason: str) -> None:
        with self._on([run_id]):
            super().mark_interrupted(run_id, step, reason)

    def add_metrics(self, run_id: str, metrics) -> None:  # noqa: ANN001
        with self._on([run_id]):
            super().add_metrics(run_id, metrics)

    def abandon(self, spec_hash: str, seed: int, reason: str, at: datetime | None = None) -> int:
        ids = [b["run_id"] for b in self._bundled(spec_hash, seed) if b["status"] in ("running", "interrupted")]
        if not ids:
            return 0
        with self._on(ids):
            return super().abandon(spec_hash, seed, reason, at)

    def add_perf(self, rows) -> None:  # noqa: ANN001
        raise StoreError("benchmark rows are not part of a run's bundle; pass --store to `harness bench`")

    # -- reads: the runs' bundles on disk ------------------------------------------------------------
    def _bundled(self, spec_hash: str, seed: int) -> list[dict[str, Any]]:
        """The run rows of this spec+seed's bundles (with their metrics), read and validated from disk."""
        out = []
        key = f"*-{spec_hash[:10]}-s{seed}"
        for m in sorted(self.runs_dir.glob(f"{key}/{BUNDLES}/*/manifest.json")):
            if m.parent.name.startswith("."):
                continue
            b = read_bundle(m.parent)
            run = b.run
            if run["spec_hash"] == spec_hash and run["seed"] == seed:
                metrics = {r["name"]: r["value"] for r in b.tables["metrics"].to_pylist() if r["value"] is not None}
                out.append({**run, "metrics": metrics})
        return out

    def find_finished(self, spec_hash: str, seed: int) -> dict[str, Any] | None:
        done = [r for r in self._bundled(spec_hash, seed) if r["status"] == "finished"]
        if not done:
            return None
        r = max(done, key=lambda r: (r["finished_at"] or datetime.min, r["started_at"] or datetime.min))
        return {"run_id": r["run_id"], "step": r["step"], "finished_at": r["finished_at"], "metrics": r["metrics"]}

    def find_resumable(self, spec_hash: str, seed: int) -> dict[str, Any] | None:
        todo = [r for r in self._bundled(spec_hash, seed) if r["status"] in ("running", "failed", "interrupted")]
        if not todo:
            return None
        r = max(todo, key=lambda r: r["started_at"] or datetime.min)
        return {"run_id": r["run_id"], "status": r["status"], "step": r["step"]}

    def find_run(self, run_id: str) -> dict[str, Any]:
        self._load(run_id)
        return self._journal[run_id]["runs"].to_pylist()[0]

    def query(self, sql: str, params: list[Any] | None = None):  # noqa: ANN201
        raise StoreError("a bundles-mode run has no store to query; `harness import` its runs directory first")


def _run_tables(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, pa.Table] | None:
    out = run_tables(con, run_id, ordered=True)
    return out if out["runs"].num_rows else None


class RecordingStore(Store):
    """The DuckDB store, every run write mirrored into the run's bundle (``--store-mode store``, the default).

    The store stays the record: a bundle that cannot be written is one warning line, not a failed run."""

    mode = "store"

    def __init__(self, path: str | os.PathLike[str], runs_dir: str | os.PathLike[str],
                 lock_timeout: float = 300.0) -> None:
        super().__init__(path, lock_timeout)
        self.bundles = BundleStore(runs_dir)
        self._skip: set[str] = set()  # runs without a bundle to mirror into (started before bundles existed)

    def with_timeout(self, lock_timeout: float) -> "RecordingStore":
        other = RecordingStore(self.path, self.bundles.runs_dir, lock_timeout)
        other.bundles, other._skip = self.bundles, self._skip
        return other

    def _mirror(self, run_id: str, fn, *args: Any, **kw: Any) -> None:  # noqa: ANN001
        if run_id in self._skip:
            return
        try:
            fn(*args, **kw)
        except (BundleError, OSError, duckdb.Error) as exc:
            self._skip.add(run_id)
            print(f"harness: note: run {run_id}: its result bundle is not written ({exc}); the store has the run "
                  f"(`harness export {run_id} --to DIR` writes one)", file=sys.stderr, flush=True)

    def register_machine(self, info: dict[str, Any]) -> None:
        super().register_machine(info)
        self.bundles.register_machine(info)

    def start_run(self, row: dict[str, Any]) -> None:
        super().start_run(row)
        self._mirror(row["run_id"], self.bundles.start_run, row)

    def update_progress(self, run_id: str, step: int, curves=()) -> None:  # noqa: ANN001
        curves = list(curves)
        super().update_progress(run_id, step, curves)
        self._mirror(run_id, self.bundles.update_progress, run_id, step, curves)

    def truncate_after(self, run_id: str, step: int) -> None:
        super().truncate_after(run_id, step)
        self._mirror(run_id, self.bundles.truncate_after, run_id, step)

    def finish_run(self, run_id: str, status: str, step: int, metrics=(), curves=(), routing=(),  # noqa: ANN001
                   routing_health=(), error: str | None = None, at: datetime | None = None) -> None:
        rows = dict(metrics=list(metrics), curves=list(curves), routing=list(routing),
                    routing_health=list(routing_health), error=error, at=at or now())
        super().finish_run(run_id, status, step, **rows)
        self._mirror(run_id, self.bundles.finish_run, run_id, status, step, **rows)

    def mark_interrupted(self, run_id: str, step: int, reason: str) -> None:
        super().mark_interrupted(run_id, step, reason)
        self._mirror(run_id, self.bundles.mark_interrupted, run_id, step, reason)

    def add_metrics(self, run_id: str, metrics) -> None:  # noqa: ANN001
        metrics = list(metrics)
        super().add_metrics(run_id, metrics)
        self._mirror(run_id, self.bundles.add_metrics, run_id, metrics)

    def abandon(self, spec_hash: str, seed: int, reason: str, at: datetime | None = None) -> int:
        at = at or now()
        n = super().abandon(spec_hash, seed, reason, at)
        self._mirror(f"{spec_hash}/{seed}", self.bundles.abandon, spec_hash, seed, reason, at)
        return n
