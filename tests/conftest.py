"""Test tiers and the golden-curve flag, in one place.

`make test` runs every tier that can run on the machine; `make test-fast` deselects
``-m "not slow and not multiprocess and not gpu"`` for the inner loop (under 2 minutes on 2 cores).
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/golden/*.json from this run instead of only comparing with them")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return request.config.getoption("--update-golden")
