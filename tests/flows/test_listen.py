"""`twinhub listen`: a real MLLP listener process on 127.0.0.1, a real TCP client, a real store."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import pytest
from hl7.mllp import open_hl7_connection

from connectors.labs.hl7v2 import Hl7v2Connector, Hl7v2Source, split_messages
from connectors.labs.mllp import ack
from flows.sync import harmonized, land_batches
from tests.support.cli import run_cli, start_listener
from tests.support.data import SHARED
from twin_store import TwinStore, connect

HL7 = SHARED / "labs" / "hl7v2"


def store_contents(store: Path) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    con = connect(store)
    resources = con.sql("SELECT resource_type, id, content_hash FROM fhir_resource ORDER BY ALL").fetchall()
    # "message N: why": N counts messages in a file, or on the listener
    reasons = con.sql("SELECT split_part(reason, ': ', 2) FROM quarantine ORDER BY ALL").fetchall()
    return resources, reasons


async def send_all(port: int, messages: list[str]) -> list[str]:
    reader, writer = await open_hl7_connection("127.0.0.1", port)
    acks = []
    for message in messages:
        writer.writeblock(message.encode())
        await writer.drain()
        acks.append((await asyncio.wait_for(reader.readblock(), 60)).decode())
    writer.close()
    return acks


def msa(ack_text: str) -> list[str]:
    return next(s for s in ack_text.split("\r") if s.startswith("MSA")).split("|")


@pytest.mark.slow
@pytest.mark.skipif(not HL7.is_dir(), reason=f"shared HL7 v2 samples not found at {HL7}")
def test_messages_over_mllp_are_acked_and_land_as_the_files_do(tmp_path: Path) -> None:
    (tmp_path / "twinhub.toml").write_text(
        '[store]\npath = "mllp-store"\n'
        f'[[sources]]\nname = "labs"\nkind = "hl7v2"\npath = "{HL7}"\nport = 0\n'
    )
    proc, port = start_listener(tmp_path / "twinhub.toml", "labs")
    try:
        source = Hl7v2Source(name="labs", kind="hl7v2", path=HL7)
        messages = [m for f in Hl7v2Connector(source).files() for m in split_messages(f)]
        acks = asyncio.run(send_all(port, [*messages, "hello, not HL7"]))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    codes = [msa(a)[1] for a in acks]
    assert (codes.count("AA"), codes.count("AE"), codes[-1]) == (26, 2, "AR")
    assert all(msa(a)[2] == m.split("\r")[0].split("|")[9] for a, m in zip(acks, messages, strict=False))
    assert "not a LOINC code" in msa(acks[codes.index("AE")])[3]

    with TwinStore(tmp_path / "file-store") as store:  # the same messages, from the files
        run = store.begin_run("labs", "sync")
        land_batches(store, run, harmonized(source, Hl7v2Connector(source).pull(None)))
    over_mllp, from_files = store_contents(tmp_path / "mllp-store"), store_contents(tmp_path / "file-store")
    assert over_mllp[0] == from_files[0]
    assert len(over_mllp[1]) == 3 and set(from_files[1]) < set(over_mllp[1]), "and the non-HL7 frame too"


def test_acks_echo_the_control_id_and_escape_the_reason() -> None:
    message = "MSH|^~\\&|LAB|ACME|TWIN|HUB|20240301||ORU^R01^ORU_R01|C123|P|2.5.1\rPID|1||X"
    accepted = ack(message, None).split("\r")
    assert accepted[0].split("|")[2:6] == ["TWIN", "HUB", "LAB", "ACME"] and "ACK^R01^ACK" in accepted[0]
    assert accepted[1] == "MSA|AA|C123|"
    refused = ack(message, "OBX-3 holds 'a|b^c', bad").split("\r")
    assert refused[1] == "MSA|AE|C123|OBX-3 holds 'a\\F\\b\\S\\c', bad"
    assert refused[2].startswith("ERR|||207")
    assert ack("garbage", None).split("\r")[1].startswith("MSA|AR||not an HL7 v2 message")


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    """Issue 16, item 7: no asyncio traceback, the port and the fix named."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "twinhub.toml").write_text(
            '[store]\npath = "store"\n'
            f'[[sources]]\nname = "labs"\nkind = "hl7v2"\npath = "in"\nport = {port}\n'
        )
        result = run_cli(
            "--config", str(tmp_path / "twinhub.toml"), "listen", "labs", check=False, timeout=60
        )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: source 'labs': cannot listen on 127.0.0.1:{port} (Address already in use); stop what "
        "holds the port or set another `port`"
    ]
