"""Conformance over EVERY registered router: new routers and plugins are covered with no new test code."""
import pytest

from harness.conformance import check_router
from harness.registry import router_names


@pytest.mark.parametrize("name", router_names())
def test_router_conformance(name):
    check_router(name)
