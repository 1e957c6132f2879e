"""``harness regress`` (transitional: registered by harness.tools.regress)."""
from harness.tools.regress import register_cli as register  # noqa: F401
