"""argparse ``type=`` functions shared by every sub-command: bad values fail at parse time.

Each raises ``argparse.ArgumentTypeError`` with what was wrong and what is expected;
``harness.cli`` turns that into one line ``harness: error: argument --x: ...`` and exit 2.
They only look at the file system, never write to it (``probe_dir`` writes and removes a probe).
"""
from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

from .errors import UserError

SEED_MAX = 2**32 - 1  # numpy's seed range


def _bad(msg: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(msg)


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    def f(s: str) -> int:
        try:
            if not s.strip().isascii():
                raise ValueError(s)
            v = int(s.strip())
        except ValueError:
            raise _bad(f"expected an integer, got {s!r}") from None
        if lo is not None and v < lo:
            raise _bad(f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise _bad(f"must be <= {hi}, got {v}")
        return v

    f.__name__ = "integer"
    return f


positive_int = int_range(1)
nonneg_int = int_range(0)


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:

    def f(s: str) -> float:
        try:
            if not s.strip().isascii():
                raise ValueError(s)
            v = float(s.strip())
        except ValueError:
            raise _bad(f"expected a number, got {s!r}") from None
        if not math.isfinite(v):
            raise _bad(f"expected a finite number, got {s!r}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise _bad(f"must be {'>' if lo_open else '>='} {lo}, got {v:g}")
        if hi is not None and v > hi:
            raise _bad(f"must be <= {hi}, got {v:g}")
        return v

    f.__name__ = "number"
    return f


def split_csv(s: str | None) -> list[str]:
    """``"smoe, moge,"`` -> ``["smoe", "moge"]``: the comma lists every sub-command takes (already validated)."""
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def seeds(s: str) -> str:
    """``0,1,2``: distinct integers in numpy's seed range (returned as given, validated)."""
    parts = [x.strip() for x in s.split(",")]
    if not s.strip() or any(not p for p in parts):
        raise _bad(f"expected comma-separated seeds such as 0,1,2, got {s!r}")
    try:
        if not s.isascii():
            raise ValueError(s)
        vals = [int(p) for p in parts]
    except ValueError:
        raise _bad(f"seeds must be integers such as 0,1,2, got {s!r}") from None
    bad = [v for v in vals if not 0 <= v <= SEED_MAX]
    if bad:
        raise _bad(f"seeds must be between 0 and {SEED_MAX}, got {bad[0]}")
    if len(set(vals)) != len(vals):
        raise _bad(f"seed listed twice in {s!r}: each seed is one sample")
    return ",".join(parts)


def names(s: str) -> str:
    """``smoe,moge``: a non-empty list of distinct names (returned as given, validated)."""
    parts = [x.strip() for x in s.split(",")]
    if not s.strip() or any(not p for p in parts):
        raise _bad(f"expected comma-separated names such as smoe,moge, got {s!r}")
    if len(set(parts)) != len(parts):
        raise _bad(f"name listed twice in {s!r}")
    return ",".join(parts)


def nonempty(s: str) -> str:
    if not s.strip():
        raise _bad("must not be empty")
    return s


def _path(s: str) -> Path:
    if not s.strip():
        raise _bad("empty path")
    if "\0" in s:
        raise _bad(f"path contains a NUL byte: {s!r}")
    return Path(s).expanduser()


def _nearest_existing(p: Path) -> Path:
    q = p
    while not q.exists() and q != q.parent:
        q = q.parent
    return q


def _creatable_in(p: Path, what: str) -> None:
    """``p`` does not exist: its nearest existing ancestor must be a directory we can write."""
    anc = _nearest_existing(p.parent if str(p.parent) else Path("."))
    if not anc.is_dir():
        raise _bad(f"{what} {p}: {anc} is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise _bad(f"{what} {p}: {anc} is not writable; choose a writable location")


def store_file(s: str) -> str:
    """A results store path: an existing regular file, or a file that can be created."""
    p = _path(s)
    try:
        if p.exists():
            if p.is_dir():
                raise _bad(f"{p} is a directory; give a file such as {p / 'harness.duckdb'}")
            if not p.is_file():
                raise _bad(f"{p} is not a regular file")
            if not os.access(p, os.R_OK):
                raise _bad(f"{p} is not readable")
        else:
            _creatable_in(p, "store")
    except OSError as exc:
        raise _bad(f"{p}: {exc.strerror or exc}") from None
    return str(p)


def out_dir(s: str) -> str:
    """A directory to write into: an existing directory, or one that can be created."""
    p = _path(s)
    try:
        if p.exists():
            if not p.is_dir():
                raise _bad(f"{p} is a file, not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise _bad(f"{p} is not writable")
        else:
            _creatable_in(p, "directory")
    except OSError as exc:
        raise _bad(f"{p}: {exc.strerror or exc}") from None
    return str(p)


def in_dir(s: str) -> str:
    """An existing, readable directory."""
    p = _path(s)
    if not p.exists():
        raise _bad(f"{p} does not exist")
    if not p.is_dir():
        raise _bad(f"{p} is a file, not a directory")
    if not os.access(p, os.R_OK | os.X_OK):
        raise _bad(f"{p} is not readable")
    return str(p)


def dir_or_missing(s: str) -> str:
    """A directory to read from that may not exist yet (then nothing is found there); never a file."""
    p = _path(s)
    if p.exists() and not p.is_dir():
        raise _bad(f"{p} is a file, not a directory")
    return str(p)


def in_file(s: str) -> str:
    """An existing, readable regular file."""
    p = _path(s)
    if not p.exists():
        raise _bad(f"{p} does not exist")
    if p.is_dir():
        raise _bad(f"{p} is a directory, not a file")
    if not os.access(p, os.R_OK):
        raise _bad(f"{p} is not readable")
    return str(p)


def out_file(s: str) -> str:
    """A file to (over)write: not a directory; its directory exists or can be created."""
    p = _path(s)
    if p.is_dir():
        raise _bad(f"{p} is a directory, not a file")
    if not p.exists():
        _creatable_in(p, "file")
    return str(p)


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device(s: str) -> str:
    """``auto | cpu | cuda | cuda:N``; CUDA only where a device is present."""
    if not _DEVICE.match(s.strip()):
        raise _bad(f"expected auto, cpu, cuda or cuda:N, got {s!r}")
    s = s.strip()
    if s.startswith("cuda"):
        import torch  # lazy: argument types are imported by the leaderboard launcher too; only cuda values need it

        if not torch.cuda.is_available():
            raise _bad(f"{s}: no CUDA device is available here; use --device cpu (or auto)")
        if ":" in s and int(s.split(":")[1]) >= torch.cuda.device_count():
            raise _bad(f"{s}: only {torch.cuda.device_count()} CUDA device(s) here")
    return s


def port(s: str) -> int:
    v = int_range(1, 65535)(s)
    return v


_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def address(s: str) -> str:
    """An interface address to bind: an IPv4/IPv6 address or a host name."""
    s2 = s.strip()
    try:
        ipaddress.ip_address(s2)
        return s2
    except ValueError:
        pass
    if not _HOST.match(s2):
        raise _bad(f"expected an IP address such as 127.0.0.1 or 0.0.0.0, or a host name, got {s!r}")
    return s2


def probe_dir(d: str | os.PathLike[str], what: str, flag: str) -> None:
    """Raise :class:`UserError` unless files can be written in ``d``; leaves nothing behind.

    Creates the missing directories and a probe file, then removes both: a read-only
    file system, a full disk or ``/proc`` fails here, before any run starts.
    """
    d = Path(d)
    for attempt in range(8):  # processes started together probe one missing directory: one's mkdir or rmdir can
        created: list[Path] = []  # land between another's checks (FileExistsError / FileNotFoundError): again
        try:
            missing = []
            p = d
            while not p.exists() and p != p.parent:
                missing.append(p)
                p = p.parent
            if not p.is_dir():
                raise UserError(f"{what} {d}: {p} is a file, not a directory; pass {flag} a directory")
            for m in reversed(missing):
                m.mkdir()
                created.append(m)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".harness-write-probe-")
            os.close(fd)
            os.unlink(tmp)
            return
        except (FileExistsError, FileNotFoundError) as exc:
            if attempt == 7:
                raise UserError(f"cannot write {what} {d}: {exc.strerror or exc}; pass {flag} a writable "
                                f"location") from None
        except OSError as exc:
            raise UserError(f"cannot write {what} {d}: {exc.strerror or exc}; pass {flag} a writable location") \
                from None
        finally:
            for m in reversed(created):
                try:
                    m.rmdir()
                except OSError:
                    pass
        time.sleep(0.01 * (attempt + 1))


def int_list(lo: int | None = 1) -> Callable[[str], list[int]]:
    """``8,16,32``: a non-empty comma-separated list of integers, each ``>= lo`` (default: positive)."""
    one = int_range(lo)

    def f(s: str) -> list[int]:
        parts = split_csv(s)
        if not parts:
            raise _bad(f"expected comma-separated integers such as 8,16, got {s!r}")
        try:
            return [one(p) for p in parts]
        except argparse.ArgumentTypeError as exc:
            raise _bad(f"{exc} in {s!r}") from None

    f.__name__ = "integer list"
    return f

