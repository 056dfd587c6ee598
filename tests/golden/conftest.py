"""The `update` flag of the golden tests: set by `pytest tests/golden --update-golden` (the option
is declared in tests/conftest.py, so that any pytest run knows it)."""

from __future__ import annotations

import pytest


@pytest.fixture
def update(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))
