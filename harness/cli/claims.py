"""``harness claims`` (transitional: registered by harness.tools.claims)."""
from harness.tools.claims import register_cli as register  # noqa: F401
