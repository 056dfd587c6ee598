"""HL7 v2 results through a real store: nothing inside one message supersedes another, and a
message older than what landed (MSH-7) never undoes it, from a file or over MLLP."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from hl7.mllp import open_hl7_connection

from connectors.labs.hl7v2 import Hl7v2Connector, Hl7v2Source
from flows.sync import harmonized, land_batches
from tests.support.cli import start_listener
from tests.support.hl7v2 import MESSAGE
from twin_store import RunReport, TwinStore, connect

FINAL = MESSAGE.replace("20240301093000+0100", "20240301093100+0100").replace("|N|||P|", "|N|||F|")
"""The final results, sent at 09:31."""
PRELIMINARY = (
    MESSAGE.replace("MSG001", "MSG000")
    .replace("20240301093000+0100", "20240301091500+0100")
    .replace("|||F", "|||P")
)
"""The same results as preliminary, sent earlier (09:15) but arriving later."""


def sync(store_path: Path, path: Path) -> RunReport:
    source = Hl7v2Source(name="labs", kind="hl7v2", path=path)
    with TwinStore(store_path) as store:
        run = store.begin_run("labs", "sync")
        land_batches(store, run, harmonized(source, Hl7v2Connector(source).pull(None)))
        store.finish_run(run, "succeeded")
    return run


def statuses(store_path: Path) -> list[tuple[str, str]]:
    con = connect(store_path)
    return con.sql(
        """SELECT resource_type, resource->>'status' FROM fhir_resource
        WHERE resource_type IN ('DiagnosticReport', 'Observation') ORDER BY ALL"""
    ).fetchall()


def test_ten_thousand_results_of_one_code_all_land_and_none_is_superseded(tmp_path: Path) -> None:
    head = MESSAGE.split("\rOBX")[0]
    obx = [f"OBX|{n}|NM|8867-4^Heart rate^LN||{60 + n % 40}|/min^/min^UCUM|||||F" for n in range(1, 10_001)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "hr.hl7").write_text("\r".join([head, *obx]) + "\r")
    run = sync(tmp_path / "store", tmp_path / "in")
    assert (run.counts["superseded"], run.counts["quarantined"]) == (0, 0)
    con = connect(tmp_path / "store")
    assert con.sql("SELECT count(*), sum(value_numeric) FROM lab_result").fetchone() == (
        10_000,
        sum(60 + n % 40 for n in range(1, 10_001)),
    )


def test_an_older_message_in_a_later_file_or_the_same_file_leaves_the_final_results(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "a.hl7").write_text(FINAL + "\r")
    sync(tmp_path / "store", inbox)
    final = statuses(tmp_path / "store")
    assert {s for _, s in final} == {"final"}
    (inbox / "a.hl7").unlink()
    (inbox / "b.hl7").write_text(PRELIMINARY + "\r")  # in a later sync
    run = sync(tmp_path / "store", inbox)
    assert statuses(tmp_path / "store") == final
    assert (run.counts["superseded"], run.counts["unchanged"]) == (5, 1), "older: report, specimen, results"

    (inbox / "b.hl7").write_text(FINAL + "\r" + PRELIMINARY + "\r")  # one batch: the newest copy wins
    sync(tmp_path / "other-store", inbox)
    assert statuses(tmp_path / "other-store") == final


async def send(port: int, message: str) -> str:
    reader, writer = await open_hl7_connection("127.0.0.1", port)
    writer.writeblock(message.encode())
    await writer.drain()
    ack = (await asyncio.wait_for(reader.readblock(), 60)).decode()
    writer.close()
    return ack


def test_an_older_preliminary_message_over_mllp_is_acked_and_leaves_the_final_results(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "final.hl7").write_text(FINAL + "\r")
    sync(tmp_path / "store", tmp_path / "in")
    final = statuses(tmp_path / "store")
    (tmp_path / "twinhub.toml").write_text(
        f'[store]\npath = "{tmp_path / "store"}"\n'
        f'[[sources]]\nname = "labs"\nkind = "hl7v2"\npath = "{tmp_path / "in"}"\nport = 0\n'
    )
    proc, port = start_listener(tmp_path / "twinhub.toml", "labs")
    try:
        ack = asyncio.run(send(port, PRELIMINARY))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    msa = next(s for s in ack.split("\r") if s.startswith("MSA")).split("|")
    assert msa[1:3] == ["AA", "MSG000"], "accepted: an older message is no error"
    assert statuses(tmp_path / "store") == final
    assert len(final) == 4
