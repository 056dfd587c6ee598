"""Running the `twinhub` command as a user does: a subprocess of this virtualenv's script."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

TWINHUB = str(Path(sys.executable).with_name("twinhub"))


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


def wait_for_landed_lines(
    store: Path, proc: subprocess.Popen[str], minimum: int, timeout: float = 120
) -> int:
    """Wait until the store's runs have read `minimum` lines while `proc` (a sync) runs."""
    from twin_store import connect

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            row = connect(store).sql("SELECT coalesce(sum(lines_read), 0) FROM ingest_run").fetchone()
            if row and row[0] >= minimum:
                return int(row[0])
        except Exception:
            pass  # the store is not created yet
        time.sleep(0.05)
    raise AssertionError(f"sync ended or stalled before landing {minimum} lines: {proc.poll()}")


def start_listener(config: Path, source: str) -> tuple[subprocess.Popen[str], int]:
    """`twinhub listen SOURCE` in a process of its own, and the port it says it listens on."""
    proc = subprocess.Popen(
        [TWINHUB, "--config", str(config), "listen", source],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening" not in line:
        proc.kill()
        raise AssertionError(proc.stderr.read() if proc.stderr else line)
    return proc, int(line.split("port ")[1].split(";")[0])
