"""Shared fixtures: real stores on disk, a real Prefect test server, the shared sample data."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

# A real FHIR server (sekmet) for the EHR connector tests; the Fitbit Web API stand-in.
pytest_plugins = ["tests.fhir_server", "tests.fitbit_server"]

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SYNTHEA = SHARED / "fhir" / "bulk-ndjson" / "synthea-r4-617-bundles-derived"
TWINHUB = str(Path(sys.executable).with_name("twinhub"))


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


def write_ndjson(path: Path, lines: list[dict[str, object] | str]) -> Path:
    """One line per item: dicts as compact JSON, strings verbatim (for broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"".join((item.encode() if isinstance(item, str) else orjson.dumps(item)) + b"\n" for item in lines)
    )
    return path


def write_config(folder: Path, source_path: Path, name: str = "src", **extra: object) -> Path:
    options = "".join(f"{k} = {orjson.dumps(v).decode()}\n" for k, v in extra.items())
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "twinhub.toml"
    config.write_text(
        f'[store]\npath = "{folder / "store"}"\n\n[[sources]]\nname = "{name}"\n'
        f'kind = "fhir-ndjson"\npath = "{source_path}"\n{options}'
    )
    return config


def run_cli(
    *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [TWINHUB, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"twinhub {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


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
