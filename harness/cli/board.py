"""``harness board`` (transitional: registered by harness.tools.board)."""
from harness.tools.board import register_cli as register  # noqa: F401
