"""The result bundle: one run's rows as Parquet files plus a JSON manifest, in one directory.

    <bundle>/manifest.json      format, format_version, schema_version, run_id, status, row counts per table,
                                content_sha256 over the Parquet files
    <bundle>/runs.parquet       the run row (resolved spec, spec hash, seed, git sha, versions, machine id, status)
    <bundle>/machines.parquet   the machine the run ran on (0 or 1 row)
    <bundle>/metrics.parquet, curves.parquet, routing.parquet, routing_health.parquet

Columns and types are the store's (:mod:`harness.store`, schema version ``SCHEMA_VERSION``). A bundle is data,
never code: Parquet and JSON only, read with pyarrow and ``json``; anything else in the directory, a manifest
that does not parse or describe these tables, a hash mismatch, an unknown format version, a newer schema, a
missing column or a wrong type refuses the bundle with one line naming the file (:class:`BundleError`, a
:class:`~harness.errors.UserError`). No database is opened to write or read one.

Writes are atomic: the files go into a hidden temporary directory beside the bundle, which is then renamed
into place (an earlier version of the same bundle is renamed aside first and removed after).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from ..store import RUN_STATUSES, SCHEMA_VERSION

FORMAT = "moe-harness-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20

_S, _I, _F, _T = pa.string(), pa.int32(), pa.float64(), pa.timestamp("us")
# table -> (column, arrow type) in the store's column order (harness.store._DDL; tests/test_bundles.py checks)
TABLES: dict[str, tuple[tuple[str, pa.DataType], ...]] = {
    "runs": (("run_id", _S), ("suite", _S), ("router", _S), ("spec_hash", _S), ("seed", _I), ("preset", _S),
             ("status", _S), ("step", _I), ("total_steps", _I), ("git_sha", _S), ("machine_id", _S),
             ("started_at", _T), ("finished_at", _T), ("config", _S), ("versions", _S), ("error", _S)),
    "machines": (("machine_id", _S), ("hostname", _S), ("cpu", _S), ("threads", _I), ("gpu", _S),
                 ("platform", _S), ("python", _S), ("first_seen", _T)),
    "metrics": (("run_id", _S), ("name", _S), ("value", _F), ("stderr", _F), ("split", _S), ("step", _I)),
    "curves": (("run_id", _S), ("step", _I), ("name", _S), ("value", _F)),
    "routing": (("run_id", _S), ("step", _I), ("layer", _I), ("expert", _I), ("load", _F)),
    "routing_health": (("run_id", _S), ("step", _I), ("layer", _I), ("name", _S), ("value", _F)),
}
RUN_TABLES = ("metrics", "curves", "routing", "routing_health")  # the tables keyed by run_id besides runs
SCHEMAS = {t: pa.schema(list(cols)) for t, cols in TABLES.items()}
# run ids name directories (export writes DIR/<run_id>/): harness makes <suite>-<router>-<hash>-s<seed>-<6 hex>
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+=-]{0,254}$")


class BundleError(UserError):
    """A bundle that cannot be used; the message names the file and what is wrong with it."""


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    tables: dict[str, pa.Table]

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    @property
    def run(self) -> dict[str, Any]:
        return self.tables["runs"].to_pylist()[0]


def to_table(name: str, rows: Iterable[Sequence[Any]] | pa.Table) -> pa.Table:
    """Rows (tuples in column order) or an arrow table (columns by name) as the bundle's table ``name``."""
    schema = SCHEMAS[name]
    if isinstance(rows, pa.Table):
        return rows.select(schema.names).cast(schema)
    cols = list(zip(*rows)) or [()] * len(schema)
    return pa.table([pa.array(list(c), type=f.type) for c, f in zip(cols, schema)], schema=schema)


def _digest(files: Sequence[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in files:
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def write_bundle(dest: str | os.PathLike[str], tables: dict[str, Iterable[Sequence[Any]] | pa.Table]) -> Path:
    """Write a bundle at ``dest`` (a directory, replaced atomically if it exists); returns ``dest``."""
    dest = Path(dest)
    data = {t: to_table(t, tables.get(t, ())) for t in TABLES}
    runs = data["runs"].to_pylist()
    if len(runs) != 1:
        raise ValueError(f"a bundle holds one run, got {len(runs)} run rows")
    files = []
    for t, tbl in data.items():
        sink = pa.BufferOutputStream()
        pq.write_table(tbl, sink, compression="zstd")
        files.append((f"{t}.parquet", sink.getvalue().to_pybytes()))
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "schema_version": SCHEMA_VERSION,
        "run_id": runs[0]["run_id"], "status": runs[0]["status"],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "tables": {t: {"file": f"{t}.parquet", "rows": data[t].num_rows} for t in TABLES},
        "content_sha256": _digest(files),
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dest.parent / f".{dest.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        for name, blob in files:
            _write_file(tmp / name, blob)
        _write_file(tmp / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        _fsync_dir(tmp)
        old = None
        if dest.exists():  # a directory cannot be renamed over a non-empty one: move the old version aside
            old = dest.parent / f".{dest.name}.old-{tag}"
            os.rename(dest, old)
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def _write_file(path: Path, blob: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading and validating -------------------------------------------------------------------

def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    """The bundle at ``path`` (its directory or its manifest.json), fully validated; :class:`BundleError` if not."""
    d = Path(path)
    if d.name == MANIFEST:
        d = d.parent
    mpath = d / MANIFEST
    manifest = _read_manifest(mpath)
    expected = {MANIFEST} | {f"{t}.parquet" for t in TABLES}
    try:
        present = {p.name for p in d.iterdir()}
    except OSError as exc:
        raise BundleError(f"bundle {d}: cannot list it ({exc.strerror or exc})") from None
    extra = sorted(present - expected)
    if extra:
        raise BundleError(f"bundle {d / extra[0]}: unexpected file in a bundle (a bundle holds only {MANIFEST} and "
                          f"its Parquet tables; data, never code)")
    blobs = []
    for t in TABLES:
        f = d / f"{t}.parquet"
        try:
            blobs.append((f.name, f.read_bytes()))
        except FileNotFoundError:
            raise BundleError(f"bundle {f}: missing (the manifest lists table {t})") from None
        except OSError as exc:
            raise BundleError(f"bundle {f}: cannot read it ({exc.strerror or exc})") from None
    digest = _digest(blobs)
    if digest != manifest["content_sha256"]:
        raise BundleError(f"bundle {mpath}: content hash mismatch (manifest {manifest['content_sha256'][:12]}..., "
                          f"files {digest[:12]}...): the Parquet files were changed or damaged after it was written")
    tables = {}
    for (name, blob), t in zip(blobs, TABLES):
        tables[t] = _read_table(d / name, blob, t, manifest["tables"][t]["rows"])
    _check_rows(d, manifest, tables)
    return Bundle(d, manifest, tables)


def _read_manifest(mpath: Path) -> dict[str, Any]:
    try:
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"bundle {mpath}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"bundle {mpath}: no manifest (not a result bundle)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle {mpath}: bad manifest, not JSON ({exc})") from None
    except OSError as exc:
        raise BundleError(f"bundle {mpath}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"bundle {mpath}: bad manifest, not a {FORMAT} manifest")
    fv, sv = m.get("format_version"), m.get("schema_version")
    if not isinstance(fv, int) or isinstance(fv, bool) or fv != FORMAT_VERSION:
        raise BundleError(f"bundle {mpath}: unknown format version {fv!r} (this harness reads version "
                          f"{FORMAT_VERSION}); upgrade moe-harness to read it")
    if not isinstance(sv, int) or isinstance(sv, bool) or sv < 1:
        raise BundleError(f"bundle {mpath}: bad manifest, schema_version {sv!r}")
    if sv > SCHEMA_VERSION:
        raise BundleError(f"bundle {mpath}: schema version {sv} is newer than this harness's ({SCHEMA_VERSION}); "
                          f"upgrade moe-harness (pip install -U moe-harness) to import it")
    rid, tabs, h = m.get("run_id"), m.get("tables"), m.get("content_sha256")
    if not isinstance(rid, str) or not RUN_ID.match(rid):
        raise BundleError(f"bundle {mpath}: bad manifest, run_id {str(rid)[:80]!r} is not a run id")
    if not isinstance(h, str) or not re.fullmatch(r"[0-9a-f]{64}", h):
        raise BundleError(f"bundle {mpath}: bad manifest, content_sha256 is not a sha256 hex digest")
    if not isinstance(tabs, dict) or set(tabs) != set(TABLES):
        got = sorted(tabs) if isinstance(tabs, dict) else type(tabs).__name__
        raise BundleError(f"bundle {mpath}: bad manifest, tables {got} (expected {sorted(TABLES)})")
    for t, entry in tabs.items():
        rows = entry.get("rows") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or entry.get("file") != f"{t}.parquet" or not isinstance(rows, int) \
                or isinstance(rows, bool) or rows < 0:
            raise BundleError(f"bundle {mpath}: bad manifest, table {t} entry {str(entry)[:80]}")
    return m


def _read_table(f: Path, blob: bytes, table: str, rows: int) -> pa.Table:
    try:
        pf = pq.ParquetFile(pa.BufferReader(blob))
        schema = pf.schema_arrow
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise BundleError(f"bundle {f}: not a readable Parquet file ({type(exc).__name__})") from None
    want = SCHEMAS[table]
    for field in want:
        if field.name not in schema.names:
            raise BundleError(f"bundle {f}: missing column {field.name!r} (table {table})")
        got = schema.field(field.name).type
        if got != field.type:
            raise BundleError(f"bundle {f}: column {field.name!r} has type {got}, expected {field.type}")
    extra = [n for n in schema.names if n not in want.names]
    if extra:
        raise BundleError(f"bundle {f}: unexpected column {extra[0][:80]!r} (table {table})")
    if pf.metadata.num_rows != rows:
        raise BundleError(f"bundle {f}: {pf.metadata.num_rows} rows, the manifest says {rows}")
    try:
        tbl = pf.read(columns=want.names)
    except Exception as exc:  # noqa: BLE001
        raise BundleError(f"bundle {f}: not a readable Parquet file ({type(exc).__name__})") from None
    return tbl.select(want.names).cast(want)


def _check_rows(d: Path, manifest: dict[str, Any], tables: dict[str, pa.Table]) -> None:
    """What the store's keys rely on: one run row naming the manifest's run, every row of the other tables
    belonging to it, a known status, and at most the run's own machine."""
    runs = tables["runs"].to_pylist()
    f = d / "runs.parquet"
    if len(runs) != 1:
        raise BundleError(f"bundle {f}: {len(runs)} run rows (a bundle holds exactly one run)")
    run = runs[0]
    if run["run_id"] != manifest["run_id"]:
        raise BundleError(f"bundle {f}: run_id {str(run['run_id'])[:80]!r} is not the manifest's "
                          f"{manifest['run_id']!r}")
    if run["status"] not in RUN_STATUSES:
        raise BundleError(f"bundle {f}: unknown status {str(run['status'])[:40]!r} (one of {', '.join(RUN_STATUSES)})")
    for col in ("suite", "router", "spec_hash", "seed"):
        if run[col] is None:
            raise BundleError(f"bundle {f}: the run row has no {col}")
    for t in RUN_TABLES:
        ids = set(tables[t].column("run_id").to_pylist())
        if ids - {run["run_id"]}:
            other = sorted(str(i) for i in ids - {run["run_id"]})[0]
            raise BundleError(f"bundle {d / (t + '.parquet')}: rows of another run ({other[:80]!r})")
    machines = tables["machines"].to_pylist()
    if len(machines) > 1 or (machines and machines[0]["machine_id"] != run["machine_id"]):
        raise BundleError(f"bundle {d / 'machines.parquet'}: holds a machine other than the run's "
                          f"({run['machine_id']!r})")


def find_bundles(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Bundle directories under ``paths`` (bundles, run directories, any directory above them, manifest files or
    globs of those), in a stable order; and the paths that named nothing (missing, or no bundle below them)."""
    import glob

    found: dict[Path, None] = {}
    empty = []
    for p in paths:
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        hits = 0
        for m in matches:
            q = Path(m)
            if q.name == MANIFEST and q.is_file():
                found[q.parent] = None
                hits += 1
            elif q.is_dir():
                if (q / MANIFEST).is_file():
                    found[q] = None
                    hits += 1
                    continue
                for mf in sorted(q.rglob(MANIFEST)):
                    if not any(part.startswith(".") for part in mf.relative_to(q).parts):  # temporaries
                        found[mf.parent] = None
                        hits += 1
        if not hits:
            empty.append(p)
    return list(found), empty


def run_tables(con: Any, run_id: str, ordered: bool = False) -> dict[str, pa.Table]:
    """One run's rows in a DuckDB connection holding the store's tables, as the bundle's tables (one
    query per table, the machine row by the run's machine_id). ``ordered``: the per-run tables in
    insertion order (``rowid``), which a bundles-mode journal needs to rewrite its rows unchanged."""
    out = {}
    for t, cols in TABLES.items():
        names = ", ".join(c for c, _ in cols)
        if t == "machines":
            sql = f"SELECT {names} FROM machines WHERE machine_id IN (SELECT machine_id FROM runs WHERE run_id = ?)"
        else:
            sql = f"SELECT {names} FROM {t} WHERE run_id = ?" + (" ORDER BY rowid" if ordered and t != "runs" else "")
        out[t] = to_table(t, con.sql(sql, params=[run_id]).to_arrow_table())
    return out
