"""Say how many of the docs' snippets ran and how many were skipped, and why (CI prints it)."""

from __future__ import annotations

from collections import Counter

import pytest

RAN: Counter[str] = Counter()
SKIPPED: Counter[str] = Counter()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "tests/docs/test_snippets.py::" not in report.nodeid or "[" not in report.nodeid:
        return
    tier = "run in the sandbox" if "test_block_runs" in report.nodeid else "checked"
    if report.skipped and isinstance(report.longrepr, tuple):
        SKIPPED[f"{tier}: {report.longrepr[2].removeprefix('Skipped: ')}"] += 1
    elif report.when == "call":
        RAN[f"{tier} ({report.outcome})"] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RAN and not SKIPPED:
        return
    done = ", ".join(f"{n} {what}" for what, n in sorted(RAN.items()))
    terminalreporter.write_line(f"docs snippets: {done}; {sum(SKIPPED.values())} skipped")
    for reason, n in sorted(SKIPPED.items()):
        terminalreporter.write_line(f"  skipped {n}x, {reason}")
