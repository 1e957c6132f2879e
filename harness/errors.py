"""The one base class for mistakes a user can fix.

Anything raised as a :class:`UserError` (``SpecError``, ``StoreError``,
``CheckpointError``, argument errors, ...) is printed by the CLI as one line
``harness: error: <message>`` and exits 2; its message says what to do.
"""
from __future__ import annotations


class UserError(Exception):
    """A bad input or environment problem with a one-line fix in its message."""


class UsageError(UserError):
    """A bad command line (argparse)."""
