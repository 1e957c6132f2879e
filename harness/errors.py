"""The one base class for mistakes a user can fix, and the exceptions every layer may raise or catch.

Anything raised as a :class:`UserError` (``SpecError``, ``StoreError``,
``CheckpointError``, argument errors, ...) is printed by the CLI as one line
``harness: error: <message>`` and exits 2; its message says what to do.
"""
from __future__ import annotations


class UserError(Exception):
    """A bad input or environment problem with a one-line fix in its message."""


class UsageError(UserError):
    """A bad command line (argparse)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so the running run is recorded ``interrupted`` before exit.

    Raised by the CLI's SIGTERM handler (``harness.cli``); the trainer (``harness.training.loop``), a lower
    layer, catches it as a ``KeyboardInterrupt`` and names it SIGTERM in the run's record. It lives here, in
    the bottom layer, so both import the one class."""
