"""A sync that waits on its server holds no lock: while a bulk export stays "in progress", another
source's sync lands and an MLLP message is ACKed at once. Real processes throughout: the CLI, a
listener on 127.0.0.1, a tiny Bulk Data server that never finishes its export."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hl7.mllp import open_hl7_connection

from tests.support.cli import TWINHUB, run_cli
from tests.support.data import write_ndjson
from tests.support.hl7v2 import MESSAGE
from tests.support.stuck_export import StuckExport, stuck_export
from twin_store import connect


@pytest.fixture
def bulk_server() -> Iterator[StuckExport]:
    with stuck_export() as server:
        yield server


async def ack_of(port: int, message: str, within: float) -> str:
    reader, writer = await open_hl7_connection("127.0.0.1", port)
    writer.writeblock(message.encode())
    await writer.drain()
    try:
        return (await asyncio.wait_for(reader.readblock(), within)).decode()
    finally:
        writer.close()


@pytest.mark.slow
def test_a_waiting_export_holds_no_lock(
    tmp_path: Path, bulk_server: StuckExport, api_env: dict[str, str]
) -> None:
    files = write_ndjson(
        tmp_path / "files" / "Patient.ndjson", [{"resourceType": "Patient", "id": f"p{i}"} for i in range(3)]
    )
    (tmp_path / "hl7").mkdir()  # the listener's source reads no files here
    config = tmp_path / "twinhub.toml"
    config.write_text(
        '[store]\npath = "store"\n\n'
        f'[[sources]]\nname = "ehr"\nkind = "fhir-bulk"\nbase_url = "{bulk_server.base_url}"\n\n'
        f'[[sources]]\nname = "files"\nkind = "fhir-ndjson"\npath = "{files.parent}"\n\n'
        f'[[sources]]\nname = "labs"\nkind = "hl7v2"\npath = "{tmp_path / "hl7"}"\nport = 0\n'
    )
    env = {**api_env}
    exporting = subprocess.Popen(
        [TWINHUB, "--config", str(config), "sync", "ehr"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    listening = None
    try:
        deadline = time.monotonic() + 300
        while bulk_server.polls < 2:  # kicked off, its job saved, now waiting
            assert exporting.poll() is None, exporting.communicate()
            assert time.monotonic() < deadline, "the bulk sync never started polling"
            time.sleep(0.2)

        listening = subprocess.Popen(
            [TWINHUB, "--config", str(config), "listen", "labs"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert listening.stdout is not None
        line = listening.stdout.readline()
        assert "listening" in line, listening.stderr.read() if listening.stderr else line
        port = int(line.split("port ")[1].split(";")[0])
        started = time.monotonic()
        ack = asyncio.run(ack_of(port, MESSAGE, within=5))
        assert time.monotonic() - started < 5
        assert "MSA|" in ack

        started = time.monotonic()
        synced = run_cli("--config", str(config), "sync", "files", env=env, check=False, timeout=150)
        assert synced.returncode == 0, synced.stderr
        assert exporting.poll() is None  # the export still waits, all along
    finally:
        for process in (listening, exporting):
            if process is not None:
                process.send_signal(signal.SIGINT)  # Ctrl-C
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    con = connect(tmp_path / "store")
    landed = con.sql("SELECT source, count(*) FROM fhir_resource GROUP BY ALL ORDER BY ALL").fetchall()
    assert [source for source, _ in landed] == ["files", "labs"] and dict(landed)["files"] == 3
