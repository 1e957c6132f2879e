"""``harness bench`` (transitional: registered by harness.bench)."""
from harness.bench import register_cli as register  # noqa: F401
