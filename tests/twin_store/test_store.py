from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pyarrow as pa
import pytest

from connectors.fhir.ndjson import FhirNdjsonConnector, FhirNdjsonSource
from tests.support.data import write_ndjson
from twin_store import RunReport, TwinStore, Window, connect, prepare
from twin_store.prepare import _may_contain
from twin_store.resources import ResourceWriter


def land_folder(store: TwinStore, folder: Path, *, window: Window | None = None) -> RunReport:
    source = FhirNdjsonSource(name="src", kind="fhir-ndjson", path=folder)
    run = store.begin_run("src", "backfill" if window else "sync")
    since = None if window else store.watermark("src")
    for batch in FhirNdjsonConnector(source).pull(since):
        store.land(run, prepare(batch, backfill=window is not None), window=window)
    return store.finish_run(run, "succeeded")


def obs(i: int, value: float, when: str = "2020-01-01T00:00:00Z") -> dict[str, object]:
    return {
        "resourceType": "Observation",
        "id": f"o{i}",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": when,
        "valueQuantity": {
            "value": value,
            "unit": "/min",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }


def test_upserts_are_idempotent_and_versioned(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_ndjson(data / "Observation.ndjson", [obs(1, 60), obs(2, 70)])
    with TwinStore(tmp_path / "store") as store:
        first = land_folder(store, data)
        again = land_folder(store, data)
        write_ndjson(data / "Observation.ndjson", [obs(1, 61), obs(2, 70), obs(3, 80)])
        changed = land_folder(store, data)
    assert (first.counts["inserted"], first.changed["observation"]) == (2, 2)
    assert again.counts["lines_read"] == 0 and again.changed == {}
    assert (changed.counts["inserted"], changed.counts["updated"], changed.counts["unchanged"]) == (
        1,
        1,
        1,
    )
    assert changed.changed["observation"] == 2, "only the new and the updated resource are recomputed"
    con = connect(tmp_path / "store")
    assert con.sql("SELECT id, version_id FROM fhir_resource ORDER BY id").fetchall() == [
        ("o1", 2),
        ("o2", 1),
        ("o3", 1),
    ]
    assert con.sql("SELECT id, value_numeric, code, patient_id FROM observation ORDER BY 1").fetchall() == [
        ("o1", 61.0, "8867-4", "p1"),
        ("o2", 70.0, "8867-4", "p1"),
        ("o3", 80.0, "8867-4", "p1"),
    ]
    old = con.sql(
        f"SELECT value_numeric FROM observation AT (VERSION => {first.snapshot_id}) WHERE id = 'o1'"
    ).fetchall()
    assert old == [(60.0,)]


def test_bad_lines_are_quarantined_once_with_reasons(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_ndjson(data / "Observation.ndjson", [obs(1, 60), "{broken", {"resourceType": "Observation"}])
    with TwinStore(tmp_path / "store") as store:
        run = land_folder(store, data)
        backfill = land_folder(
            store,
            data,
            window=Window(since=datetime(2000, 1, 1, tzinfo=UTC), until=datetime(2030, 1, 1, tzinfo=UTC)),
        )
    assert run.counts["lines_read"] == run.counts["inserted"] + run.counts["quarantined"] == 3
    assert backfill.counts["quarantined"] == 2 and backfill.counts["unchanged"] == 1
    rows = (
        connect(tmp_path / "store")
        .sql("SELECT line_no, reason, raw FROM quarantine ORDER BY line_no")
        .fetchall()
    )
    assert rows == [
        (2, "invalid JSON", "{broken"),
        (3, "missing id", '{"resourceType":"Observation"}'),
    ]


def test_backfill_window_and_rederive(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_ndjson(
        data / "Observation.ndjson",
        [obs(1, 60, "2019-03-01T00:00:00Z"), obs(2, 70, "2021-03-01T00:00:00Z")],
    )
    window = Window(since=datetime(2019, 1, 1, tzinfo=UTC), until=datetime(2020, 1, 1, tzinfo=UTC))
    with TwinStore(tmp_path / "store") as store:
        report = land_folder(store, data, window=window)
        assert store.watermark("src") is None
        again = land_folder(store, data, window=window)
    assert (report.counts["inserted"], report.counts["out_of_window"]) == (1, 1)
    assert (
        again.counts["unchanged"],
        again.changed["observation"],
        again.changed["fhir_resource"],
    ) == (1, 1, 0)
    ids = connect(tmp_path / "store").sql("SELECT id FROM fhir_resource").fetchall()
    assert ids == [("o1",)]


def test_a_stale_copy_never_replaces_a_newer_resource(tmp_path: Path) -> None:
    newer = {**obs(1, 61), "meta": {"lastUpdated": "2024-02-01T00:00:00Z"}}
    older = {**obs(1, 60), "meta": {"lastUpdated": "2024-01-01T00:00:00Z"}}
    write_ndjson(tmp_path / "a" / "Observation.ndjson", [newer])
    write_ndjson(tmp_path / "b" / "Observation.ndjson", [older])
    with TwinStore(tmp_path / "store") as store:
        land_folder(store, tmp_path / "a")
        land_folder(store, tmp_path / "b")
    [(resource,)] = connect(tmp_path / "store").sql("SELECT resource FROM fhir_resource").fetchall()
    assert orjson.loads(resource)["valueQuantity"]["value"] == 61


def test_of_two_copies_in_one_batch_the_newest_lands(tmp_path: Path) -> None:
    newer = {**obs(1, 61), "meta": {"lastUpdated": "2024-02-01T00:00:00Z"}}
    older = {**obs(1, 60), "meta": {"lastUpdated": "2024-01-01T00:00:00Z"}}
    write_ndjson(tmp_path / "data" / "Observation.ndjson", [newer, older, obs(2, 70), obs(2, 71)])
    with TwinStore(tmp_path / "store") as store:
        report = land_folder(store, tmp_path / "data")
    assert (report.counts["inserted"], report.counts["superseded"], report.counts["lines_read"]) == (2, 2, 4)
    rows = connect(tmp_path / "store").sql("SELECT id, value_numeric FROM observation ORDER BY 1").fetchall()
    assert rows == [("o1", 61.0), ("o2", 71.0)]


def test_view_tables_whose_definition_changed_are_rebuilt_from_the_raw_table(tmp_path: Path) -> None:
    from flows.sample_export import write_sample_export

    write_sample_export(tmp_path / "export", patients=5)
    with TwinStore(tmp_path / "store") as store:
        land_folder(store, tmp_path / "export")
    con = connect(tmp_path / "store")
    before = {t: con.sql(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in ("patient", "observation")}
    con.close()
    with TwinStore(tmp_path / "store") as store:  # as if two definitions had changed since
        for table in ("patient", "observation"):
            store.con.execute(f"ALTER TABLE twin.{table} ADD COLUMN stale INTEGER")
            store.con.execute(f"COMMENT ON TABLE twin.{table} IS 'an older definition'")
    with TwinStore(tmp_path / "store"):
        pass
    con = connect(tmp_path / "store")
    after = {t: con.sql(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in ("patient", "observation")}
    assert after == before
    assert len(before["patient"]) == 5
    described = con.sql(
        "SELECT comment FROM duckdb_columns() WHERE table_name = 'observation' AND column_name = 'patient_id'"
    ).fetchone()
    assert described == ("The Patient the resource is about",), "column descriptions reach the catalog"


def test_a_failed_batch_leaves_no_trace_in_what_the_writer_knows(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The writer judges batches against its own copy of the stored keys: a batch that fails
    after updating that copy must not make the next one think its content already landed."""
    data = tmp_path / "data"
    write_ndjson(data / "Observation.ndjson", [obs(1, 60)])
    with TwinStore(tmp_path / "store") as store:
        land_folder(store, data)
        write_ndjson(data / "Observation.ndjson", [obs(1, 61), obs(2, 70)])

        def boom(*args: object, **kwargs: object) -> None:
            raise RuntimeError("crash after the raw upsert")

        with monkeypatch.context() as patched:
            patched.setattr(ResourceWriter, "_materialize", boom)
            with pytest.raises(RuntimeError, match="crash after the raw upsert"):
                land_folder(store, data)
        again = land_folder(store, data)
        kept = store.con.sql(
            "SELECT resource_type, id, version_id, content_hash, last_updated FROM temp.stored_keys "
            "ORDER BY id"
        ).fetchall()
        stored = store.con.sql(
            "SELECT resource_type, id, version_id, content_hash, last_updated FROM twin.fhir_resource "
            "ORDER BY id"
        ).fetchall()
    assert (again.counts["inserted"], again.counts["updated"]) == (1, 1)
    assert kept == stored and [row[2] for row in stored] == [2, 1]
    rows = connect(tmp_path / "store").sql("SELECT id, value_numeric FROM observation ORDER BY 1").fetchall()
    assert rows == [("o1", 61.0), ("o2", 70.0)]


def test_a_needle_is_found_across_scan_steps_and_chunks() -> None:
    text = pa.chunked_array([pa.array(["abc", "xx-needle-xx"]), pa.array(["zz"])])
    assert _may_contain(text, b"needle", step=4)
    assert _may_contain(text.slice(1), b"needle-xx", step=5)
    assert not _may_contain(text, b"needles", step=4)
    assert not _may_contain(pa.chunked_array([], pa.string()), b"needle")


def test_a_reader_with_a_query_open_never_blocks_the_writer(tmp_path: Path) -> None:
    """The catalog runs in SQLite's WAL mode: without it the reader's shared lock made the
    writer's commit fail with "database is locked"."""
    with TwinStore(tmp_path) as store:
        store.finish_run(store.begin_run("src", "sync"), "succeeded")
    reader = connect(tmp_path)
    pending = reader.sql("SELECT run_id FROM run_record")
    assert pending.fetchone() is not None  # the result stays open, rows left unread
    with TwinStore(tmp_path) as store:
        run = store.finish_run(store.begin_run("src", "sync"), "succeeded")
    assert connect(tmp_path).sql(
        f"SELECT status FROM run_record WHERE run_id = '{run.run_id}'"
    ).fetchall() == [("succeeded",)]
    reader.close()


def test_run_records_an_earlier_twinhub_kept_in_the_ducklake_move_beside_it(tmp_path: Path) -> None:
    """Run records used to be a DuckLake table (each record a snapshot); the next write moves
    them to runs.sqlite, and `ingest_run` reads them there with their batches' counts."""
    write_ndjson(tmp_path / "export" / "Observation.ndjson", [obs(1, 60.0)])
    with TwinStore(tmp_path / "store") as store:
        landed = land_folder(store, tmp_path / "export")
        store.con.execute(
            "CREATE TABLE twin.run_record (run_id VARCHAR, source VARCHAR, flow VARCHAR, started_at "
            "TIMESTAMPTZ, finished_at TIMESTAMPTZ, status VARCHAR, snapshot_id BIGINT, error VARCHAR)"
        )
        store.con.execute(
            "INSERT INTO twin.run_record VALUES (?, 'src', 'sync', now(), now(), 'succeeded', ?, NULL)",
            [landed.run_id, landed.snapshot_id],
        )
        store.con.execute("CREATE VIEW twin.ingest_run AS SELECT * FROM twin.run_record")
    (tmp_path / "store" / "runs.sqlite").unlink()

    with TwinStore(tmp_path / "store"):
        pass
    con = connect(tmp_path / "store")
    assert con.sql("SELECT run_id, status, snapshot_id, lines_read FROM ingest_run").fetchall() == [
        (landed.run_id, "succeeded", landed.snapshot_id, 1)
    ]
    left = "SELECT count(*) FROM duckdb_tables() WHERE database_name = 'twin' AND table_name = 'run_record'"
    assert con.sql(left).fetchone() == (0,)
