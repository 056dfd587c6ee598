"""A `twinhub sync` killed outright (SIGKILL, the OOM killer) leaves no process behind: the
temporary Prefect server it started, and anything else it started, die with it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.support.cli import TWINHUB
from tests.support.stuck_export import stuck_export


@pytest.mark.slow
def test_a_killed_sync_leaves_no_processes_behind(tmp_path: Path) -> None:
    with stuck_export() as server:
        config = tmp_path / "twinhub.toml"
        config.write_text(
            '[store]\npath = "store"\n\n'
            f'[[sources]]\nname = "ehr"\nkind = "fhir-bulk"\nbase_url = "{server.base_url}"\n'
        )
        # No Prefect server set: the command starts its temporary one.
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
        sync = subprocess.Popen(
            [TWINHUB, "--config", str(config), "sync", "ehr"],
            env={**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "stderr").open("w"),
        )
        try:
            deadline = time.monotonic() + 300
            while server.polls < 2:  # the export is waiting: the run is well under way
                assert sync.poll() is None, (tmp_path / "stderr").read_text()
                assert time.monotonic() < deadline, "the sync never started polling"
                time.sleep(0.2)
            started = psutil.Process(sync.pid).children(recursive=True)
            assert any("uvicorn" in " ".join(p.cmdline()) for p in started)  # the temporary server
        finally:
            sync.kill()
            sync.wait()
    _, alive = psutil.wait_procs(started, timeout=10)
    left = [" ".join(p.cmdline())[:120] for p in alive]
    for process in alive:  # leave no process of ours either way
        process.kill()
    assert not left, f"still running 10 s after the sync was killed: {left}"
