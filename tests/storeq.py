"""Helpers shared by the end-to-end tests: the tiny-run flags, a read-only store query, and the SIGINT
disposition a signalled child needs."""
import signal

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
