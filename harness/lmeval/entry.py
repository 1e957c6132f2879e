"""How lm-eval reaches the model: the ``moe-harness`` registry entry and lm-eval's own command line.

lm-eval cannot import the harness by itself (it has no plugin entry point for models), so
``import harness.lmeval`` puts ``moe-harness`` in lm-eval's model registry as a lazy
``module:attr`` entry (:func:`register`: lm-eval's registry only, not its model stack or torch),
and :func:`lm_eval_cli` (``harness lm-eval ...``, ``python -m harness.lmeval ...``) starts lm-eval's
CLI with it registered and ``--include_path tasks/lm_eval`` added.

lm-eval is imported inside these functions: this module is imported with ``harness.lmeval``, which
every ``harness`` command imports and which must work (and stay cheap) without lm-eval.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import UsageError, UserError
from .defaults import MODEL_NAME, MODEL_TARGET
from .tasks import one_line, set_offline, tasks_dir


def register() -> None:
    """Put ``moe-harness`` in lm-eval's model registry as a lazy ``module:attr`` entry (no-op without lm-eval)."""
    try:
        from lm_eval.api.registry import model_registry
        import lm_eval.models  # noqa: F401  (built-ins first: get_model() only loads them into an empty registry)
    except ImportError:  # lm-eval not installed: the rest of the harness still works
        return
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def _given(args: list[str], option: str) -> str | None:
    """The value of ``option`` (``--opt V`` or ``--opt=V``) in an lm-eval command line, or None."""
    for i, a in enumerate(args):
        if a == option:
            return args[i + 1] if i + 1 < len(args) else ""
        if a.startswith(option + "="):
            return a.split("=", 1)[1]
    return None


def lm_eval_cli(argv: Sequence[str]) -> int:
    """lm-eval's own command line with ``moe-harness`` registered and the shipped tasks included."""
    set_offline()
    register()
    args = list(argv)
    if args[:1] == ["--"]:
        args = args[1:]
    wants_tasks = not args or args[0] not in ("ls", "validate") or args[:2] == ["ls", "tasks"]
    if wants_tasks and _given(args, "--include_path") is None:
        args += ["--include_path", str(tasks_dir())]
    if _given(args, "--model") == MODEL_NAME and _given(args, "--device") is None and _given(args, "--config") is None:
        # lm-eval's own default is cuda:0, which the model refuses where there is no GPU (an explicit cuda is an
        # error, never a silent CPU run); not choosing a device means auto: CUDA when present, else the CPU
        args += ["--device", "auto"]
    from lm_eval.__main__ import cli_evaluate  # lm-eval only when its CLI runs (see the module docstring)

    def one_line_error(self, message):  # noqa: ANN001 - lm-eval's argparse errors: one line, no usage dump
        raise UsageError(f"lm-eval: {message}; see `harness lm-eval --help`")

    old, old_error = sys.argv, argparse.ArgumentParser.error
    sys.argv = ["lm-eval", *args]
    argparse.ArgumentParser.error = one_line_error
    try:
        cli_evaluate()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - lm-eval's own failures (unknown task, bad model_args): one line
        raise UserError(f"lm-eval: {type(exc).__name__}: {one_line(exc)}; see `harness lm-eval --help`") from exc
    finally:
        sys.argv = old
        argparse.ArgumentParser.error = old_error
    return 0
