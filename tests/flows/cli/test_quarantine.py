"""`twinhub quarantine list` and `replay` as a user runs them, on a real store: what is
quarantined, and reading it again once the cause is fixed."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from connectors.base import RECORD_SCHEMA, Batch, problems_from
from flows.sync import land_source
from tests.support.cli import run_cli
from tests.support.data import write_ndjson
from tests.support.kinds import write_sources_config
from twin_store import TwinStore, Window, connect, prepare

LABS = """id,patient,collected,resulted,loinc,value,unit
r1,p1,2024-03-01T08:30:00Z,2024-03-01T10:30:00Z,718-7,13.9,g/dL
r2,p1,,2024-03-02T10:30:00Z,718-7,14.1,g/dL
r3,p2,yesterday,yesterday,718-7,12.0,g/dL
"""
"""Three results: r2 has no collection time, only when it was resulted; r3's times are no times."""
NOT_A_TIME = "not a valid FHIR Observation: effectiveDateTime"


def lab_source(folder: Path, time: str) -> dict[str, object]:
    columns = {
        "id": "id",
        "patient": "patient",
        "code": "loinc",
        "time": time,
        "value": "value",
        "ucum": "unit",
    }
    return {"kind": "lab-csv", "path": str(folder / "labs.csv"), "columns": columns}


def cli(config: Path, *args: str, check: bool = True) -> str:
    result = run_cli("--config", str(config), *args, env={"COLUMNS": "80"}, check=check)
    assert all(len(line) <= 80 for line in result.stdout.splitlines()), result.stdout
    return " ".join(result.stdout.split())


def test_replay_lands_the_rows_a_fixed_mapping_maps_and_keeps_the_others(tmp_path: Path) -> None:
    (tmp_path / "labs.csv").write_text(LABS)
    config = write_sources_config(tmp_path, {"labs": lab_source(tmp_path, time="collected")})
    land_source.fn(str(config), "labs")
    con = connect(tmp_path / "store")
    (watermark,) = con.sql("SELECT watermark FROM sync_state").fetchone() or ("",)
    con.close()

    listed = cli(config, "quarantine", "list", "--limit", "1")
    assert f"labs {tmp_path / 'labs.csv'}:3 (quarantined " in listed
    assert "no time (column 'collected' is empty)" in listed and "labs.csv:4" not in listed
    assert "... 1 more (2 in all): narrow with --source or --reason" in listed

    # The fix: the time of a result is when it was resulted, a column every row has.
    write_sources_config(tmp_path, {"labs": lab_source(tmp_path, time="resulted")})
    replayed = cli(config, "quarantine", "replay", "labs")
    assert (
        "replay labs run " in replayed
        and "2 lines read -> 1 new, 0 updated, 0 unchanged, 1 quarantined" in replayed
    )
    assert "labs: 2 quarantined lines read again -> 1 left quarantine, 1 stay" in replayed

    con = connect(tmp_path / "store")
    assert (
        con.sql("SELECT id, effective FROM lab_result ORDER BY effective")
        .fetchall()[-1][1]
        .startswith("2024-03-02T10:30:00")
    ), "r2 landed, timed by the column the mapping names now"
    assert con.sql("SELECT count(*) FROM lab_result").fetchone() == (2,)
    assert con.sql("SELECT line_no FROM quarantine").fetchall() == [(4,)], "r3 stays, and only once"
    runs = con.sql(
        "SELECT flow, status, lines_read, inserted, quarantined FROM ingest_run ORDER BY started_at"
    )
    assert runs.fetchall() == [("sync", "succeeded", 3, 1, 2), ("replay", "succeeded", 2, 1, 1)]
    assert con.sql("SELECT watermark FROM sync_state").fetchone() == (watermark,), (
        "a replay moves no watermark"
    )
    con.close()

    left = cli(config, "quarantine", "list", "--reason", "VALID fhir observation")
    assert "labs.csv:4" in left and NOT_A_TIME in left and "labs.csv:3" not in left and "more" not in left


@pytest.mark.slow
def test_replay_of_a_fhir_source_lands_what_passes_now_and_only_for_kinds_it_can(tmp_path: Path) -> None:
    good = {"resourceType": "Patient", "id": "p1"}
    lines = [good, '{"resourceType": "Patient", "id": "x"', {"resourceType": "Patient"}]
    export = write_ndjson(tmp_path / "export" / "Patient.ndjson", lines)  # type: ignore[arg-type]
    sources = {
        "ehr": {"kind": "fhir-ndjson", "path": str(export.parent)},
        "genomes": {"kind": "vcf", "path": str(tmp_path / "vcf")},
    }
    config = write_sources_config(tmp_path, sources)
    land_source.fn(str(config), "ehr")
    # A line an earlier twinhub (or a plugin's own check) quarantined, which passes the checks now.
    fine = orjson.dumps({"resourceType": "Patient", "id": "p2", "gender": "female"}).decode()
    with TwinStore(tmp_path / "store") as store:
        run = store.begin_run("ehr", "backfill")
        problems = problems_from([(str(export), 4, "a check twinhub no longer makes", fine)])
        batch = Batch(records=RECORD_SCHEMA.empty_table(), problems=problems, watermark={})
        since = datetime(2000, 1, 1, tzinfo=UTC)
        store.land(run, prepare(batch), window=Window(since=since, until=datetime.now(UTC)))
        store.finish_run(run, "succeeded")

    replayed = cli(config, "quarantine", "replay", "ehr")
    assert "3 lines read -> 1 new, 0 updated, 0 unchanged, 2 quarantined" in replayed
    assert "ehr: 3 quarantined lines read again -> 1 left quarantine, 2 stay" in replayed
    con = connect(tmp_path / "store")
    assert con.sql("SELECT id FROM patient ORDER BY id").fetchall() == [("p1",), ("p2",)]
    quarantined = con.sql("SELECT line_no, reason FROM quarantine ORDER BY line_no").fetchall()
    assert quarantined == [(2, "invalid JSON"), (3, "missing id")]
    con.close()
    again = cli(config, "quarantine", "replay", "ehr")
    assert "ehr: 2 quarantined lines read again -> 0 left quarantine, 2 stay" in again
    con = connect(tmp_path / "store")
    assert con.sql("SELECT line_no, reason FROM quarantine ORDER BY line_no").fetchall() == quarantined

    result = run_cli("--config", str(config), "quarantine", "replay", "genomes", check=False)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: source 'genomes' is of kind 'vcf', whose quarantined vcf records")
    assert line.endswith("(replay works for kinds: fhir-bulk, fhir-ndjson, fhir-search, hl7v2, lab-csv)")
