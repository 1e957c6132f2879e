"""A small process pool for independent jobs (``harness run --jobs N``; reusable by ``harness regress``).

    results = run_parallel(items, jobs, fn)

runs ``fn(item, log)`` for every item in at most ``jobs`` long-lived worker
processes and returns the results in the order of ``items``. Why not
``concurrent.futures.ProcessPoolExecutor``: one worker that dies (OOM killer,
``kill -9``, a segfault in an extension) breaks that pool and every pending
future with it; here only the item that worker held is lost, it is reported
as :class:`Failed`, a fresh worker takes its place and the other items go on.

* Workers start with the ``spawn`` method: a fresh interpreter, so no forked
  torch/OpenMP thread pools or DuckDB handles, and each worker sets its own
  torch thread count. ``fn`` and the items are pickled (module-level
  functions, ``functools.partial`` of them, dataclasses).
* ``log(msg)`` inside a worker sends the line to the parent, which passes it
  to its own ``log``: one writer, whole lines, no interleaving mid-line. A
  message that is not a string (e.g. a progress tuple) goes to ``on_message``.
* An exception escaping ``fn`` becomes ``Failed(error=<traceback>)`` for that
  item; a worker that dies becomes ``Failed(error="worker process ... died ...",
  exitcode=...)``. Either way the pool goes on with the other items.
* Ctrl-C: workers ignore SIGINT (the terminal sends it to the whole process
  group); the parent catches it, sends SIGTERM (which a worker turns into
  ``KeyboardInterrupt``, so ``finally`` blocks and store rollbacks run), waits
  a few seconds, SIGKILLs stragglers and re-raises ``KeyboardInterrupt``.
* A worker whose parent disappears (``kill -9`` of the parent) is killed too
  (Linux ``PR_SET_PDEATHSIG``; elsewhere a watchdog thread), so no orphan
  keeps writing after the command is gone.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

TERM_GRACE_S = 10.0  # after Ctrl-C: how long workers get to stop before SIGKILL


@dataclass
class Failed:
    """The result of an item whose ``fn`` raised or whose worker process died."""

    error: str
    exitcode: int | None = None  # set when the worker process died


def available_cpus() -> int:
    """CPUs this process may use (affinity / cgroup cpusets respected where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_jobs(threads: int | None, n_items: int, cpus: int | None = None) -> int:
    """As many workers as fit the machine at ``threads`` torch threads each, at most one per item.

    ``threads=None`` (torch's default: every core) means one job: a second one would only oversubscribe.
    """
    cpus = available_cpus() if cpus is None else cpus
    per = threads if threads and threads > 0 else cpus
    return max(1, min(cpus // per, n_items))


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


# -- worker side ------------------------------------------------------------------------------

def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before prctl took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def _on_sigterm(signum, frame):  # noqa: ANN001
    raise KeyboardInterrupt


def _worker_main(conn, fn: Callable[[Any, Callable[[str], None]], Any], parent_pid: int) -> None:  # noqa: ANN001
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _die_with_parent(parent_pid)

    def log(msg: Any) -> None:
        conn.send(("log", None, msg))

    try:
        while True:
            try:
                task = conn.recv()
            except EOFError:
                return
            if task is None:
                return
            index, item = task
            try:
                out = ("done", index, fn(item, log))
            except Exception:  # noqa: BLE001 - reported to the parent as this item's failure
                out = ("error", index, traceback.format_exc())
            try:
                conn.send(out)
            except Exception:  # noqa: BLE001 - e.g. an unpicklable result
                conn.send(("error", index, traceback.format_exc()))
    except (KeyboardInterrupt, BrokenPipeError, EOFError):
        return


# -- parent side ------------------------------------------------------------------------------

class _Worker:
    def __init__(self, ctx, fn, wid: int) -> None:  # noqa: ANN001
        self.wid = wid
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, fn, os.getpid()), daemon=True,
                                name=f"harness-worker-{wid}")
        try:  # born ignoring SIGINT (inherited through exec), so a Ctrl-C during its start-up is not a traceback
            prev = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread
            prev = None
        try:
            self.proc.start()
        finally:
            if prev is not None:
                signal.signal(signal.SIGINT, prev)
        child.close()
        self.index: int | None = None  # the item this worker holds

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass


def run_parallel(
    items: Sequence[Any],
    jobs: int,
    fn: Callable[[Any, Callable[[str], None]], Any],
    *,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
    on_start: Callable[[int, Any, int], None] | None = None,
    on_done: Callable[[int, Any, Any], None] | None = None,
    on_message: Callable[[int, Any, Any], None] | None = None,
) -> list[Any]:
    """``[fn(item, log) for item in items]`` over ``jobs`` spawned worker processes (see the module doc).

    ``on_start(index, item, worker_id)`` runs in the parent when an item is handed to a worker, and
    ``on_done(index, item, result)`` when its result (or :class:`Failed`) comes back; both in completion
    order, while the other workers keep going. ``on_message(index, item, msg)`` gets what a worker's
    ``fn`` passed to ``log`` that is not a string.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if not items:
        return []
    pool = _Pool(items, jobs, fn, log, on_start, on_done, on_message)
    try:
        while pool.remaining:
            pool.hand_out()
            pool.reap()
        pool.close()
    except BaseException:  # Ctrl-C (or a bug here): stop every worker before re-raising
        _shutdown(pool.workers + pool.retired)
        raise
    return pool.results


class _Pool:
    """The parent's side of :func:`run_parallel`: workers, the items still to hand out, the results."""

    def __init__(self, items: Sequence[Any], jobs: int, fn: Callable[[Any, Callable[[str], None]], Any],
                 log: Callable[[str], None], on_start: Callable[[int, Any, int], None] | None,
                 on_done: Callable[[int, Any, Any], None] | None,
                 on_message: Callable[[int, Any, Any], None] | None) -> None:
        self.items, self.jobs, self.fn, self.log = items, jobs, fn, log
        self.on_start, self.on_done, self.on_message = on_start, on_done, on_message
        self.ctx = mp.get_context("spawn")
        self.results: list[Any] = [None] * len(items)
        self.pending = deque(range(len(items)))
        self.workers: list[_Worker] = []
        self.retired: list[_Worker] = []  # told to stop (nothing left for them); joined at the end
        self.next_wid = 0
        self.remaining = len(items)

    def hand_out(self) -> None:
        """Give pending items to idle workers, then to new ones up to ``jobs``; retire workers left idle."""
        while self.pending:
            idle = next((w for w in self.workers if w.index is None), None)
            if idle is None and len(self.workers) < self.jobs:
                self.next_wid += 1
                idle = _Worker(self.ctx, self.fn, self.next_wid)
                self.workers.append(idle)
            if idle is None:
                break
            i = self.pending.popleft()
            idle.index = i
            if self.on_start is not None:
                self.on_start(i, self.items[i], idle.wid)
            try:
                idle.conn.send((i, self.items[i]))
            except OSError:
                pass  # it died meanwhile: its sentinel reports the item below
        for w in [w for w in self.workers if w.index is None]:  # nothing left for them
            w.stop()
            self.workers.remove(w)
            self.retired.append(w)

    def reap(self) -> None:
        """Wait for a message or a worker's death; take every message, report a dead worker's item failed."""
        ready = wait([w.conn for w in self.workers] + [w.proc.sentinel for w in self.workers])
        for w in list(self.workers):
            if w.conn in ready:
                self._drain(w)
            if w.proc.sentinel in ready or not w.proc.is_alive():
                w.proc.join(timeout=5)
                self._drain(w)  # anything it sent before it died
                if w.index is not None:
                    code = w.proc.exitcode
                    self._finish(w, Failed(error=f"worker process {w.proc.pid} died ({describe_exit(code)}) "
                                                 f"while running this item", exitcode=code))
                self.workers.remove(w)
                w.conn.close()

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        for w in self.workers + self.retired:
            w.proc.join(timeout=30)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()

    def _drain(self, w: _Worker) -> None:
        try:
            while w.conn.poll():
                self._handle(w, w.conn.recv())
        except (EOFError, OSError):
            pass  # died; its sentinel says so

    def _handle(self, w: _Worker, msg: tuple[str, int | None, Any]) -> None:
        kind, index, payload = msg
        if kind == "log":
            if isinstance(payload, str):
                self.log(payload)
            elif self.on_message is not None and w.index is not None:
                self.on_message(w.index, self.items[w.index], payload)
        elif kind == "done":
            self._finish(w, payload)
        elif kind == "error":
            self._finish(w, Failed(error=payload))

    def _finish(self, w: _Worker, result: Any) -> None:
        i = w.index
        assert i is not None
        w.index = None
        self.results[i] = result
        self.remaining -= 1
        if self.on_done is not None:
            self.on_done(i, self.items[i], result)


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        if w.proc.is_alive():
            w.proc.terminate()  # SIGTERM -> KeyboardInterrupt in the worker
    deadline = time.monotonic() + TERM_GRACE_S
    for w in workers:
        w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join()
