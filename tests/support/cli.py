"""Running the `twinhub` command as a user does: a subprocess of this virtualenv's script."""

from __future__ import annotations

import os
import subprocess
import sys
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
