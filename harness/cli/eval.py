"""``harness eval`` (transitional: registered by harness.lmeval)."""
from harness.lmeval import register_cli as register  # noqa: F401
