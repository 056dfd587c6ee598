"""Shared fixtures: real stores on disk, a real Prefect test server, the shared sample data."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

# A real FHIR server (sekmet) for the EHR connector tests; the Fitbit Web API stand-in.
pytest_plugins = ["tests.support.fhir_server", "tests.support.fitbit_server"]

from tests.support.data import SYNTHEA  # noqa: E402 (after the plugins they need)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="rewrite the expected files of tests/golden from what the conversions make now "
        "(then review `git diff tests/golden`)",
    )


@pytest.fixture(scope="session")
def synthea() -> Path:
    if not SYNTHEA.is_dir():
        pytest.skip(f"shared Synthea export not found at {SYNTHEA} (../shared/data is absent)")
    return SYNTHEA


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect server (the test harness); subprocesses reach it through PREFECT_API_URL."""
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        assert url
        yield url


@pytest.fixture
def api_env(prefect_api: str) -> dict[str, str]:
    """Environment for CLI subprocesses: use the test Prefect server, not a temporary one each."""
    return {"PREFECT_API_URL": prefect_api}


CONFORMANCE: Counter[str] = Counter()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count the outcomes of the official SQL-on-FHIR v2 cases."""
    if "test_official_suite" in report.nodeid and (report.when == "call" or report.outcome != "passed"):
        CONFORMANCE[report.outcome] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how much of the official suite passed (CI prints it)."""
    if ran := CONFORMANCE["passed"] + CONFORMANCE["failed"]:
        terminalreporter.write_line(
            f"SQL-on-FHIR v2 conformance: {CONFORMANCE['passed']}/{ran} official cases passed"
        )
