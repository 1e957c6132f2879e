"""``harness doctor`` (transitional: registered by harness.tools.doctor)."""
from harness.tools.doctor import register_cli as register  # noqa: F401
