"""Results store: one DuckDB file (default ``results/harness.duckdb``).

DuckDB lets one process hold a file for writing at a time, so every write is
a short transaction on a connection opened for just that write, retried with
backoff while another process holds the lock. Two ``harness run`` processes
therefore both land, and the leaderboard (read-only, also short-lived
connections) never blocks a run for long. A run's final rows (metrics,
curves, routing) and its ``finished`` status are written in ONE transaction:
a run is never marked finished without all of its rows.

Tables (long format, so new metrics need no migration):
  meta(key, value)                      schema_version
  machines(machine_id, ...)             CPU model, threads, GPU, hostname
  runs(run_id, suite, router, spec_hash, seed, status, ...)
  metrics(run_id, name, value, stderr, split, step)
  curves(run_id, step, name, value)
  routing(run_id, step, layer, expert, load)
  routing_health(run_id, step, layer, name, value)
  perf(bench_id, created_at, machine_id, git_sha, router, config, metric, value, spread)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import socket
import subprocess
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

import duckdb

from .errors import UserError

SCHEMA_VERSION = 1
DEFAULT_STORE = "results/harness.duckdb"


def default_store_path() -> str:
    """The store every command uses unless given ``--store``: ``$HARNESS_STORE``, else ``DEFAULT_STORE``."""
    return os.environ.get("HARNESS_STORE") or DEFAULT_STORE

# interrupted: stopped by SIGTERM / SIGINT or a checkpoint that could not be written; --resume continues it
RUN_STATUSES = ("running", "finished", "diverged", "failed", "interrupted")

# Lock waits of this process (seconds a connect spent retrying on another process's lock): the soak test
# (tests/test_soak.py) reports the worst. With $HARNESS_LOCK_LOG set, every wait is also appended to that
# file as "pid mode seconds" (one line per connection that had to wait), so waits of many processes add up.
LOCK_WAITS: list[float] = []

_DDL = [
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE IF NOT EXISTS machines (
        machine_id VARCHAR PRIMARY KEY, hostname VARCHAR, cpu VARCHAR, threads INTEGER,
        gpu VARCHAR, platform VARCHAR, python VARCHAR, first_seen TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY, suite VARCHAR, router VARCHAR, spec_hash VARCHAR, seed INTEGER,
        preset VARCHAR, status VARCHAR, step INTEGER, total_steps INTEGER, git_sha VARCHAR,
        machine_id VARCHAR, started_at TIMESTAMP, finished_at TIMESTAMP, config VARCHAR,
        versions VARCHAR, error VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS metrics (
        run_id VARCHAR, name VARCHAR, value DOUBLE, stderr DOUBLE, split VARCHAR, step INTEGER)""",
    "CREATE TABLE IF NOT EXISTS curves (run_id VARCHAR, step INTEGER, name VARCHAR, value DOUBLE)",
    "CREATE TABLE IF NOT EXISTS routing (run_id VARCHAR, step INTEGER, layer INTEGER, expert INTEGER, load DOUBLE)",
    "CREATE TABLE IF NOT EXISTS routing_health (run_id VARCHAR, step INTEGER, layer INTEGER, name VARCHAR, value DOUBLE)",
    """CREATE TABLE IF NOT EXISTS perf (
        bench_id VARCHAR, created_at TIMESTAMP, machine_id VARCHAR, git_sha VARCHAR, router VARCHAR,
        config VARCHAR, metric VARCHAR, value DOUBLE, spread DOUBLE)""",
]


def _migrate_0_to_1(con: duckdb.DuckDBPyConnection) -> None:
    """v0 (before the meta table): runs lacked preset/versions/error/total_steps columns."""
    for col, typ in (("preset", "VARCHAR"), ("total_steps", "INTEGER"), ("versions", "VARCHAR"), ("error", "VARCHAR")):
        con.execute(f"ALTER TABLE runs ADD COLUMN IF NOT EXISTS {col} {typ}")


# _MIGRATIONS[v] upgrades a store from schema v to v + 1, inside the opening transaction.
_MIGRATIONS = {0: _migrate_0_to_1}


class StoreError(UserError, RuntimeError):
    pass


class StoreLocked(StoreError):
    pass


class UnknownRun(StoreError):
    """No run (or more than one) answers to a run id or prefix."""


def is_interrupt(exc: BaseException) -> bool:
    """A Ctrl-C or SIGTERM that landed inside a DuckDB call: DuckDB swallows the KeyboardInterrupt and raises its
    own error (InterruptException, or RuntimeError('Query interrupted') from a fetch), which a caller would
    otherwise record as a failed run instead of an interrupted, resumable one."""
    if isinstance(exc, duckdb.InterruptException):
        return True
    return isinstance(exc, RuntimeError) and "interrupted" in str(exc).lower()


def is_lock_error(exc: Exception) -> bool:
    msg = str(exc).lower()
    return "lock" in msg or "conflicting" in msg or "being used" in msg


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Store:
    """Handle on a results file; holds no open connection between calls."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_STORE, lock_timeout: float = 300.0) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self._initialised = False

    # -- connections --------------------------------------------------------
    def _connect(self, read_only: bool, on_wait=None) -> duckdb.DuckDBPyConnection:
        t0 = time.monotonic()
        deadline = t0 + self.lock_timeout
        delay, warned, waited = 0.05, False, False
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                if waited:
                    _record_wait(time.monotonic() - t0, read_only)
                return con
            except duckdb.Error as exc:
                waited = True
                if not is_lock_error(exc):
                    raise StoreError(
                        f"cannot open results store {self.path}: {exc}. If the file is damaged, move it aside "
                        f"and re-run (runs keep their checkpoints under results/runs/)"
                    ) from exc
                if time.monotonic() > deadline:
                    _record_wait(time.monotonic() - t0, read_only)
                    raise StoreLocked(
                        f"results store {self.path} stayed locked by another process for {self.lock_timeout:.0f}s; "
                        f"wait for it to finish or pass --store to use another file"
                    ) from exc
                if on_wait is not None and not warned:
                    on_wait(f"store {self.path} is busy (another process is writing); waiting...")
                    warned = True
                time.sleep(delay * (1 + random.random()))
                # writers retry often (a reader holds the file for milliseconds, so a slow retry starves the
                # writer behind a polling leaderboard); readers back off further
                delay = min(delay * 2, 1.0 if read_only else 0.2)

    @contextlib.contextmanager
    def writer(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short write transaction (committed on success, rolled back on error)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the results store's directory {self.path.parent}: "
                             f"{exc.strerror or exc}; pass --store a writable path") from None
        con = self._connect(read_only=False)
        try:
            if not self._initialised:
                self._init_schema(con)
                self._initialised = True
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                if is_interrupt(exc):
                    raise KeyboardInterrupt(f"interrupted during a write to {self.path}") from exc
                raise
            # Move the committed rows from the write-ahead log into the file before the lock is released, so
            # no committed write depends on another process replaying this one's WAL. Defensive: the soak test
            # once found a committed finish transaction missing (issue 26 note); the cause was not pinned down.
            try:
                con.execute("CHECKPOINT")
            except duckdb.Error as exc:  # the rows are committed (in the WAL) either way
                if is_interrupt(exc):
                    raise KeyboardInterrupt(f"interrupted during a checkpoint of {self.path}") from exc
        finally:
            con.close()

    @contextlib.contextmanager
    def reader(self, on_wait=None) -> Iterator[duckdb.DuckDBPyConnection]:
        if not self.path.exists():
            raise StoreError(f"no results store at {self.path}; run `harness run --suite lm` to create one")
        con = self._connect(read_only=True, on_wait=on_wait)
        try:
            yield con
        finally:
            con.close()

    def check_readable(self) -> None:
        """An existing store file opens as a DuckDB store (StoreError otherwise); no file: nothing to check."""
        if self.path.exists():
            with self.reader():
                pass

    def _init_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "meta" in tables:
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
        else:
            version = 0 if "runs" in tables else SCHEMA_VERSION  # runs without meta: a pre-versioning store
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"results store {self.path} has schema version {version}, newer than this harness "
                f"({SCHEMA_VERSION}); upgrade moe-harness (pip install -U moe-harness) or use another --store"
            )
        con.execute("BEGIN TRANSACTION")
        try:
            for ddl in _DDL:
                con.execute(ddl)
            for v in range(version, SCHEMA_VERSION):
                _MIGRATIONS[v](con)
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    # -- writes ---------------------------------------------------------------
    def register_machine(self, info: dict[str, Any]) -> None:
        with self.writer() as con:
            con.execute(
                "INSERT INTO machines VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [info["machine_id"], info["hostname"], info["cpu"], info["threads"], info["gpu"],
                 info["platform"], info["python"], now()],
            )

    def start_run(self, row: dict[str, Any]) -> None:
        cols = ["run_id", "suite", "router", "spec_hash", "seed", "preset", "status", "step", "total_steps",
                "git_sha", "machine_id", "started_at", "finished_at", "config", "versions", "error"]
        vals = [row.get(c) for c in cols]
        with self.writer() as con:
            con.execute(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", vals)

    def update_progress(self, run_id: str, step: int, curves: Iterable[tuple[int, str, float]] = ()) -> None:
        """Periodic progress: the step reached and the curve points since the last call."""
        with self.writer() as con:
            con.execute("UPDATE runs SET step = ? WHERE run_id = ?", [step, run_id])
            rows = [(run_id, s, n, float(v)) for s, n, v in curves]
            if rows:
                con.executemany("INSERT INTO curves VALUES (?, ?, ?, ?)", rows)

    def truncate_after(self, run_id: str, step: int) -> None:
        """On resume: drop curve points recorded after the checkpoint we restart from."""
        with self.writer() as con:
            con.execute("DELETE FROM metrics WHERE run_id = ?", [run_id])  # final metrics come at the end only
            # training curves are logged at the 0-based step (evaluations at the steps done), so rows at
            # `step` itself belong to the first update after the checkpoint and are redone too
            con.execute("DELETE FROM curves WHERE run_id = ? AND (step > ? OR (step = ? AND (name IN "
                        "('train_loss', 'lr') OR name LIKE 'aux/%' OR name LIKE 'stat/%')))", [run_id, step, step])
            con.execute("DELETE FROM routing WHERE run_id = ? AND step > ?", [run_id, step])
            con.execute("DELETE FROM routing_health WHERE run_id = ? AND step > ?", [run_id, step])
            con.execute("UPDATE runs SET status = 'running', error = NULL, step = ? WHERE run_id = ?", [step, run_id])

    def abandon(self, spec_hash: str, seed: int, reason: str, at: datetime | None = None) -> int:
        """Mark unfinished runs of this spec+seed failed (``--restart``); returns how many."""
        if not self.path.exists():
            return 0
        with self.writer() as con:
            n = con.execute("SELECT count(*) FROM runs WHERE spec_hash = ? AND seed = ? "
                            "AND status IN ('running', 'interrupted')",
                            [spec_hash, seed]).fetchone()[0]
            con.execute("UPDATE runs SET status = 'failed', error = ?, finished_at = ? "
                        "WHERE spec_hash = ? AND seed = ? AND status IN ('running', 'interrupted')",
                        [reason, at or now(), spec_hash, seed])
        return int(n)

    def finish_run(
        self,
        run_id: str,
        status: str,
        step: int,
        metrics: Iterable[dict[str, Any]] = (),
        curves: Iterable[tuple[int, str, float]] = (),
        routing: Iterable[tuple[int, int, int, float]] = (),
        routing_health: Iterable[tuple[int, int, str, float]] = (),
        error: str | None = None,
        at: datetime | None = None,
    ) -> None:
        """Final rows and status in one transaction (``at``: the finish time, default now)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"bad run status {status!r}")
        rows = final_rows(run_id, step, metrics, curves, routing, routing_health)
        with self.writer() as con:
            for table, vals in rows.items():
                if vals:
                    con.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(vals[0]))})", vals)
            con.execute(
                "UPDATE runs SET status = ?, step = ?, finished_at = ?, error = ? WHERE run_id = ?",
                [status, step, at or now(), error, run_id],
            )

    def with_timeout(self, lock_timeout: float) -> "Store":
        """The same store with another lock timeout (a process being stopped waits briefly)."""
        return type(self)(self.path, lock_timeout=lock_timeout)

    def mark_interrupted(self, run_id: str, step: int, reason: str) -> None:
        """A run stopped before its end (signal, unwritable checkpoint): resumable with ``--resume``."""
        with self.writer() as con:
            con.execute("UPDATE runs SET status = 'interrupted', error = ? WHERE run_id = ? AND status = 'running'",
                        [reason, run_id])

    def add_metrics(self, run_id: str, metrics: Iterable[dict[str, Any]]) -> None:
        """Extra metrics for an existing run (e.g. lm-eval tasks after pretraining)."""
        rows = metric_rows(run_id, metrics, None)
        if rows:
            with self.writer() as con:
                con.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)", rows)

    def add_perf(self, rows: Iterable[dict[str, Any]]) -> None:
        vals = [(r["bench_id"], r.get("created_at") or now(), r.get("machine_id"), r.get("git_sha"), r.get("router"),
                 json.dumps(r.get("config", {}), sort_keys=True), r["metric"], _f(r.get("value")), _f(r.get("spread")))
                for r in rows]
        if vals:
            with self.writer() as con:
                con.executemany("INSERT INTO perf VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", vals)

    # -- reads ----------------------------------------------------------------
    def query(self, sql: str, params: list[Any] | None = None):
        """Run a read query; returns a polars DataFrame."""
        with self.reader() as con:
            return con.sql(sql, params=params or None).pl()

    def find_run(self, run_id: str) -> dict[str, Any]:
        """The ``runs`` row of a run id, or of the one run whose id starts with ``run_id`` (``harness show``,
        ``harness eval``): an exact id wins over prefixes; no match or an ambiguous prefix is :class:`UnknownRun`."""
        prefix = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self.reader() as con:
            cur = con.execute("SELECT * FROM runs WHERE run_id = ? OR run_id LIKE ? ESCAPE '\\' "
                              "ORDER BY started_at DESC", [run_id, prefix])
            cols = [d[0] for d in cur.description]
            rows = [dict(zip(cols, r)) for r in cur.fetchall()]
        rows = [r for r in rows if r["run_id"] == run_id] or rows
        if not rows:
            raise UnknownRun(f"no run {run_id!r} in {self.path}; `harness runs --store {self.path}` lists them")
        if len(rows) > 1:
            ids = ", ".join(r["run_id"] for r in rows[:4]) + (", ..." if len(rows) > 4 else "")
            raise UnknownRun(f"run id prefix {run_id!r} matches {len(rows)} runs in {self.path} ({ids}); "
                             f"give more of it")
        return rows[0]

    def find_finished(self, spec_hash: str, seed: int) -> dict[str, Any] | None:
        """The latest finished run of this spec+seed with its final metrics, or None.

        ``harness run`` skips such a run unless ``--rerun``: a second copy of the same measurement is
        not another sample (issue 21)."""
        if not self.path.exists():
            return None
        with self.reader() as con:
            try:
                row = con.execute(
                    "SELECT run_id, step, finished_at FROM runs WHERE spec_hash = ? AND seed = ? "
                    "AND status = 'finished' ORDER BY finished_at DESC NULLS LAST, started_at DESC LIMIT 1",
                    [spec_hash, seed],
                ).fetchone()
                if row is None:
                    return None
                metrics = con.execute("SELECT name, value FROM metrics WHERE run_id = ? AND value IS NOT NULL",
                                      [row[0]]).fetchall()
            except duckdb.CatalogException:
                return None
        return {"run_id": row[0], "step": row[1], "finished_at": row[2], "metrics": dict(metrics)}

    def find_resumable(self, spec_hash: str, seed: int) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        with self.reader() as con:
            try:
                row = con.execute(
                    "SELECT run_id, status, step FROM runs WHERE spec_hash = ? AND seed = ? "
                    "AND status IN ('running', 'failed', 'interrupted') ORDER BY started_at DESC LIMIT 1",
                    [spec_hash, seed],
                ).fetchone()
            except duckdb.CatalogException:
                return None
        return None if row is None else {"run_id": row[0], "status": row[1], "step": row[2]}


def metric_rows(run_id: str, metrics: Iterable[dict[str, Any]], step: int | None) -> list[tuple]:
    """``metrics`` rows as stored (``step``: the step of a row that names none)."""
    return [(run_id, d["name"], _f(d.get("value")), _f(d.get("stderr")), d.get("split"), d.get("step", step))
            for d in metrics]


def final_rows(run_id: str, step: int, metrics: Iterable[dict[str, Any]] = (),
               curves: Iterable[tuple[int, str, float]] = (), routing: Iterable[tuple[int, int, int, float]] = (),
               routing_health: Iterable[tuple[int, int, str, float]] = ()) -> dict[str, list[tuple]]:
    """A run's final rows per table, as :meth:`Store.finish_run` stores them (result bundles write the same)."""
    return {
        "metrics": metric_rows(run_id, metrics, step),
        "curves": [(run_id, s, n, _f(v)) for s, n, v in curves],
        "routing": [(run_id, s, layer, e, _f(v)) for s, layer, e, v in routing],
        "routing_health": [(run_id, s, layer, n, _f(v)) for s, layer, n, v in routing_health],
    }


def _record_wait(seconds: float, read_only: bool) -> None:
    LOCK_WAITS.append(seconds)
    log = os.environ.get("HARNESS_LOCK_LOG")
    if log:
        try:
            with open(log, "a") as fh:
                fh.write(f"{os.getpid()} {'read' if read_only else 'write'} {seconds:.3f}\n")
        except OSError:
            pass


def _f(v: Any) -> float | None:
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# -- provenance -------------------------------------------------------------------

def git_sha() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha[:12] + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    import torch  # lazy: only runs call this; the leaderboard imports the store without loading torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    threads = torch.get_num_threads()
    host = socket.gethostname()
    key = f"{cpu}|{threads}|{gpu}|{host}"

    return {
        "machine_id": hashlib.sha1(key.encode()).hexdigest()[:12],
        "hostname": host,
        "cpu": cpu,
        "threads": threads,
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def package_versions() -> dict[str, str]:

    out = {}
    for pkg in ("moe-harness", "torch", "timm", "lm_eval", "duckdb", "numpy", "polars"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
