"""``harness`` command line.

    harness routers                       list registered routers
    harness run --suite lm [...]          pretrain every router, record in the store
    harness runs / harness show RUN_ID    read the store
    harness bench, harness eval, harness board, harness regress, harness doctor

Expected failures (bad spec, unknown router, missing data, locked store,
corrupt checkpoint) print one line ``harness: error: ...`` and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import keyword
import os
import signal
import sys
import threading

from .. import args as argtypes
from ..errors import Terminated, UsageError, UserError
from ..store import DEFAULT_STORE, default_store_path

EXIT_USAGE = 2
EXIT_SIGINT, EXIT_SIGTERM = 130, 143

# One module per sub-command, in `harness --help` order; each exposes ``register(sub, store_arg)``.
COMMANDS = ("routers", "run", "runs", "show", "bench", "eval", "board", "claims", "compare", "regress", "doctor",
            "import", "export")


def _module(name: str) -> str:
    """The module of a sub-command: ``import`` is a keyword, so its module is ``import_``."""
    return name + "_" if keyword.iskeyword(name) else name


class HarnessParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``harness: error: argument --x: ...; see `harness run --help```."""

    def error(self, message: str):  # noqa: ANN201 - argparse's signature
        raise UsageError(f"{message}; see `{self.prog} --help`")


_SIGTERM_SEEN = threading.Event()  # a SIGTERM that DuckDB swallowed still exits 143 (harness.store.is_interrupt)


def _on_sigterm(signum, frame):  # noqa: ANN001
    _SIGTERM_SEEN.set()
    raise Terminated()


# argparse ``type=`` checks by option name, applied to every sub-command (also those registered by other
# modules), so one bad value fails the same way everywhere, before anything runs: {dest: check}; per-command
# entries override. The checks return strings unchanged (validated), so commands parse them as before.
_ARG_TYPES = {
    "*": {"store": argtypes.store_file, "routers": argtypes.names, "seeds": argtypes.seeds,
          "tasks": argtypes.names, "jobs": argtypes.positive_int, "nproc": argtypes.positive_int,
          "node_rank": argtypes.nonneg_int, "repeats": argtypes.positive_int, "batch_size": argtypes.positive_int,
          "port": argtypes.port, "address": argtypes.address, "device": argtypes.device,
          "min_effect": argtypes.float_range(0), "baseline": argtypes.out_file, "preset": argtypes.nonempty,
          "suite": argtypes.nonempty, "run_id": argtypes.nonempty, "data_dir": argtypes.dir_or_missing,
          "limit": argtypes.float_range(0, lo_open=True)},
    "run": {"runs_dir": argtypes.out_dir},
    "eval": {"runs_dir": argtypes.in_dir},
}


def _harden(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse has no public type for it
    for name, parser in sub.choices.items():
        table = {**_ARG_TYPES["*"], **_ARG_TYPES.get(name, {})}
        for action in parser._actions:  # noqa: SLF001
            check = table.get(action.dest)
            if check is None or action.type not in (None, str, int, float) or action.nargs not in (None, "?"):
                continue
            if action.choices is not None or isinstance(action, (argparse._StoreTrueAction,  # noqa: SLF001
                                                                    argparse._StoreFalseAction)):  # noqa: SLF001
                continue
            action.type = check


def store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=default_store_path(), type=argtypes.store_file,
                   help=f"DuckDB results file (default {DEFAULT_STORE} or $HARNESS_STORE)")


# -- parser ---------------------------------------------------------------------------------

def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given the command line, only its sub-command's module is imported.

    The sub-command modules pull in what their commands need (scipy.stats for claims and regress: ~1 s),
    and every ``harness run`` (each --jobs worker's parent, each test subprocess) would pay for all of them.
    ``harness --help``, an option first or an unknown command get every sub-command, so the usage lists them.
    """
    p = HarnessParser(prog="harness", description="Benchmark harness for MoE routing strategies")
    sub = p.add_subparsers(dest="cmd", required=True)
    named = argv[0] if argv and argv[0] in COMMANDS else None
    for name in COMMANDS:
        if named in (None, name):
            importlib.import_module(f"{__name__}.{_module(name)}").register(sub, store_arg)
    _harden(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    prev_term = None
    try:
        if threading.current_thread() is threading.main_thread():
            prev_term = signal.signal(signal.SIGTERM, _on_sigterm)
            _SIGTERM_SEEN.clear()
    except (ValueError, OSError):  # pragma: no cover - not the main thread of the main interpreter
        prev_term = None
    try:
        args = build_parser(argv).parse_args(argv)
        args.argv = argv  # `harness run --nproc N` re-launches exactly this command line through torchrun
        return int(args.fn(args) or 0)
    except UserError as exc:
        _error_line(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        if isinstance(exc, Terminated) or _SIGTERM_SEEN.is_set():
            print("harness: terminated (SIGTERM); unfinished runs are recorded as interrupted: "
                  "`harness run ... --resume` continues them", file=sys.stderr)
            return EXIT_SIGTERM
        print("harness: interrupted; unfinished runs can be continued with --resume", file=sys.stderr)
        return EXIT_SIGINT
    except OSError as exc:  # the environment (disk full, read-only, permissions): say which file, not a traceback
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        _error_line(f"{exc.strerror or exc}{where}; free space or fix the permissions, then re-run "
                    f"(`harness run ... --resume` continues unfinished runs)")
        return EXIT_USAGE
    finally:
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)


def _error_line(msg: str) -> None:
    msg = " ".join(str(msg).split())  # one line, whatever the exception's message held
    print(f"harness: error: {msg}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
