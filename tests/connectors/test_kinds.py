"""What each source kind's `describe` says about a source's progress (`twinhub status`), on the
watermarks its own connector writes: pulled from small files, from a real FHIR server (sekmet)
and from the Fitbit Web API stand-in, as a sync pulls them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors.base import Batch
from connectors.kinds import Context, kind_names, source_kind
from tests.support.data import write_ndjson
from tests.support.fhir_server import FhirServer, start_server
from tests.support.fitbit import connect, make_source, pull, token_store
from tests.support.fitbit_server import FitbitServer, User
from tests.support.kinds import FILE_KINDS, SERVER_KINDS, load_small_ehr, server_table, write_file_source


def connector_pull(
    kind: str, table: dict[str, Any], store: Path, since: dict[str, Any] | None = None
) -> Iterator[Batch]:
    """The batches of a source of `kind`, as its kind builds its connector."""
    found = source_kind(kind)
    connector = found.build(found.config.model_validate({"name": "src", **table}), Context(store=store))
    return connector.pull(since)


def described(kind: str, batches: list[Batch]) -> list[str]:
    return [source_kind(kind).describe(b.watermark) for b in batches]


def test_every_installed_kind_has_its_status_tested_here() -> None:
    assert sorted(kind_names()) == sorted([*FILE_KINDS, *SERVER_KINDS, "fitbit"])


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_a_file_kind_says_how_many_files_landed_whole(kind: str, tmp_path: Path) -> None:
    source = write_file_source(kind, tmp_path / "in")
    batches = list(connector_pull(kind, source.table, tmp_path / "store"))
    assert described(kind, batches)[-1] == source.complete
    again = list(connector_pull(kind, source.table, tmp_path / "store", batches[-1].watermark))
    assert sum(len(b) for b in again) == 0 and set(described(kind, again)) <= {source.complete}


def test_a_file_cut_short_says_how_many_lines_of_it_landed(tmp_path: Path) -> None:
    padded = [{"resourceType": "Patient", "id": f"p{i}", "note": "x" * 1000} for i in range(3000)]
    write_ndjson(tmp_path / "in" / "Patient.ndjson", padded)
    batches = list(
        connector_pull(
            "fhir-ndjson", {"kind": "fhir-ndjson", "path": str(tmp_path / "in"), "batch_mb": 1}, tmp_path
        )
    )
    first = batches[0].records.num_rows
    assert 0 < first < 3000
    assert described("fhir-ndjson", batches)[0] == f"0/1 files complete, {first:,} lines"
    assert described("fhir-ndjson", batches)[-1] == "1/1 files complete, 3,000 lines"


def test_a_csv_counts_its_data_rows_not_its_lines(tmp_path: Path) -> None:
    source = write_file_source("lab-csv", tmp_path / "in")
    batches = list(connector_pull("lab-csv", {**source.table, "batch_rows": 1}, tmp_path))
    assert described("lab-csv", batches) == [
        "0/1 files complete, 1 row",
        "0/1 files complete, 2 rows",
        "1/2 files complete, 3 rows",
        "2/2 files complete, 3 rows",
    ]


@pytest.fixture(scope="module")
def ehr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServer]:
    """A real FHIR server with three Patients large enough to split a walk, and four Observations."""
    server = start_server(tmp_path_factory.mktemp("ehr"))
    try:
        load_small_ehr(server)
        yield server
    finally:
        server.stop()


def near_now(instant: str) -> bool:
    when = datetime.fromisoformat(instant.replace("Z", "+00:00"))
    return abs(when - datetime.now(UTC)) < timedelta(minutes=5)


def test_fhir_search_says_how_far_each_type_got(ehr: FhirServer, tmp_path: Path) -> None:
    table = server_table(ehr, tmp_path, "fhir-search")
    batches = list(connector_pull("fhir-search", table, tmp_path / "store"))
    said = described("fhir-search", batches)
    assert said[0] == "Patient walking (page 2, 3 matching)"
    since = {t: st["since"] for t, st in batches[-1].watermark["types"].items()}
    assert said[-1] == f"Patient up to {since['Patient']}; Observation up to {since['Observation']}"
    assert near_now(since["Patient"]) and near_now(since["Observation"])

    # A Patient updated while the search walks: the type is asked again next time, and says so.
    pulling = connector_pull("fhir-search", table, tmp_path / "store")
    first = next(pulling)
    seen = {orjson.loads(raw)["id"] for raw in first.records["raw"].to_pylist()}
    [unseen] = {"p0", "p1", "p2"} - seen
    resource = ehr.dump(["Patient"])[("Patient", unseen)]
    ehr.put({**resource, "active": True})
    rest = list(pulling)
    held = "Patient not complete yet (it changed during the search; the next sync asks again)"
    assert described("fhir-search", rest)[-1].startswith(f"{held}; Observation up to ")


def test_fhir_bulk_says_how_far_the_export_got(ehr: FhirServer, tmp_path: Path) -> None:
    table = server_table(ehr, tmp_path, "fhir-bulk")
    batches = list(connector_pull("fhir-bulk", table, tmp_path / "store"))
    job = batches[0].watermark["job"]["status_url"]
    since = batches[-1].watermark["since"]
    assert near_now(since)
    said = described("fhir-bulk", batches)
    assert said[0] == f"no export finished yet; export job {job} in progress, no file landed yet"
    # Observation.ndjson landed, and the first batch of Patient.ndjson (its three lines, 1.8 MB)
    assert f"no export finished yet; export job {job} in progress, 1 file landed, 7 lines" in said
    assert said[-1] == f"exported up to {since}"

    again = list(connector_pull("fhir-bulk", table, tmp_path / "store", batches[-1].watermark))
    next_job = again[0].watermark["job"]["status_url"]
    assert described("fhir-bulk", again) == [
        f"exported up to {since}; export job {next_job} in progress, no file landed yet",
        f"exported up to {again[-1].watermark['since']}",
    ]


def test_fitbit_says_how_many_patients_are_complete_through_which_day(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    fitbit_server.state.users["USER2"] = User(
        "USER2", timezone="Europe/Berlin", last_sync="2016-12-10T07:00:00"
    )
    source = make_source(fitbit_server, tmp_path, since="2016-12-08")
    tokens = token_store(source)
    connect(fitbit_server, source, tokens, "p0", "USER0", scopes="profile settings")  # allows no data
    connect(fitbit_server, source, tokens, "p1", "USER1")
    connect(fitbit_server, source, tokens, "p2", "USER2")
    batches, _ = pull(source, tokens)  # on 2016-12-15; USER1's tracker synced on 12-14, USER2's on 12-10
    said = described("fitbit", batches)
    assert said[0] == "2 patients: 1 complete through 2016-12-13, 1 with no day complete yet"
    assert said[-1] == (
        "3 patients: 2 complete through 2016-12-09 (the furthest through 2016-12-13), "
        "1 with no day complete yet"
    )
    synced = {p: marks for p, marks in batches[-1].watermark["patients"].items() if marks}
    assert source_kind("fitbit").describe({"patients": synced}) == (
        "2 patients, all complete through 2016-12-09 (the furthest through 2016-12-13)"
    )
    assert source_kind("fitbit").describe({}) == "no patient pulled yet"
