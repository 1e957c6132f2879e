"""Helpers shared by the end-to-end tests: the tiny-run flags, a read-only store query, and the SIGINT
disposition a signalled child needs."""
import os
import signal
import time
from pathlib import Path

import duckdb

TINY = ["--preset", "tiny", "--no-eval", "--quiet"]
# The 80-step run the kill / signal / resume tests interrupt; conftest's `uninterrupted_80` trains it once per
# session, uninterrupted, as their reference (threads=1: numerics independent of the process).
RESUMABLE = ["run", "--suite", "lm", "--routers", "smoe", *TINY, "--set", "train.steps=80",
             "--set", "train.ckpt_every=10", "--set", "train.eval_every=20", "--set", "train.threads=1"]
RESUME_GROUP = "resume-reference"  # xdist group: the tests that compare with `uninterrupted_80` share one worker


def q(store, sql, params=()):
    """Rows of a read-only query on a DuckDB results file (connection closed at once)."""
    con = duckdb.connect(str(store), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def default_sigint() -> None:
    """``preexec_fn`` for a child the test will Ctrl-C: give it the default SIGINT disposition.

    A process started in the background by a non-interactive shell (CI runners, ``nohup``, cron, IDE test
    panes, ``make test &``) inherits SIGINT as *ignored*; Python then installs no KeyboardInterrupt handler
    and the child would never see the test's Ctrl-C. ``(trap '' INT; make test)`` reproduces that start.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has closed its files: its DuckDB lock is gone


def kill9_tree(pid: int, timeout: float = 60.0) -> None:
    """``kill -9`` a process and everything below it, and return once none of them runs any more.

    Stop first, then kill: a tree that is still running can fork a child between the listing and the kill
    (torchrun starting a worker) and that child would keep the store's lock. SIGKILL is asynchronous -- a
    big torch process takes a while to tear down -- so wait until every killed process is gone (or a
    zombie, whose files are closed) before the caller opens the store.
    """
    stopped: list[int] = []
    while True:
        todo = [p for p in [pid, *descendants(pid)] if p not in stopped]
        if not todo:
            break
        for p in todo:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            stopped.append(p)
    for p in stopped:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in stopped):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes still alive {timeout:.0f} s after kill -9: "
                                 f"{[p for p in stopped if _alive(p)]}")
        time.sleep(0.02)
