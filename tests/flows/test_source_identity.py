"""Every source keeps its own resources: two hospitals whose files use the same ids, through the
real pipeline into a real store. A resource is (source, type, id); the views key it
`<source>/<id>`, so the analyst's natural join never pairs one hospital's rows with the other's."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from connectors.base import DELETION_SCHEMA, RECORD_SCHEMA, SAMPLE_SCHEMA, Batch
from connectors.errors import ConfigError
from connectors.fhir.ndjson import FhirNdjsonConnector, FhirNdjsonSource
from flows.sample_export import write_sample_export
from flows.sync import land_batches
from harmonize.sql_on_fhir.fhirpath import SOURCE_BASE
from tests.support.cli import TWINHUB, run_cli, wait_for_landed_lines
from tests.support.data import write_config, write_ndjson
from tests.support.hl7v2 import MESSAGE
from tests.support.lab_feed import MRN, lab_feed, land
from twin_store import RunReport, TwinStore, connect

PATIENTS = 300
LAB_SUBJECTS = (
    "SELECT DISTINCT resource->>'$.subject.reference' FROM fhir_resource "
    "WHERE source = 'labs' AND resource_type = 'Observation'"
)


def hospital(folder: Path, name: str, last_updated: str | None = None) -> FhirNdjsonSource:
    """A fhir-ndjson source whose Patients are 1..300 (family name `<name>-<i>`) and whose
    Observations o1..o300 name them `Patient/<i>`."""
    meta = {"meta": {"lastUpdated": last_updated}} if last_updated else {}
    patients = [
        {"resourceType": "Patient", "id": str(i), **meta, "name": [{"family": f"{name}-{i}"}]}
        for i in range(1, PATIENTS + 1)
    ]
    observations = [
        {
            "resourceType": "Observation",
            "id": f"o{i}",
            **meta,
            "status": "final",
            "code": {"text": "hospital"},
            "subject": {"reference": f"Patient/{i}"},
            "valueString": name,
        }
        for i in range(1, PATIENTS + 1)
    ]
    path = write_ndjson(folder / name / "Patient.ndjson", patients)
    write_ndjson(folder / name / "Observation.ndjson", observations)
    return FhirNdjsonSource(name=name, kind="fhir-ndjson", path=path.parent)


def sync(store: Path, source: FhirNdjsonSource) -> RunReport:
    with TwinStore(store) as st:
        run = st.begin_run(source.name, "sync")
        land_batches(st, run, FhirNdjsonConnector(source).pull(None))
        return st.finish_run(run, "succeeded")


def assert_both_hospitals_kept(store: Path) -> None:
    con = connect(store)
    per_source = (
        "SELECT source, count(*), max(version_id) FROM fhir_resource WHERE resource_type = ? "
        "GROUP BY ALL ORDER BY ALL"
    )
    for resource_type in ("Patient", "Observation"):
        assert con.execute(per_source, [resource_type]).fetchall() == [
            ("north", PATIENTS, 1),
            ("south", PATIENTS, 1),
        ]
    assert con.sql("SELECT count(*) FROM patient").fetchone() == (2 * PATIENTS,)
    # The analyst's natural join pairs each hospital's observation with its own patient only.
    pairs = con.sql(
        """SELECT split_part(p.family, '-', 1) AS patient_of, o.value_string AS obs_of,
                  count(*) FROM observation o JOIN patient p ON o.patient_id = p.id
           GROUP BY ALL ORDER BY ALL"""
    ).fetchall()
    assert pairs == [("north", "north", PATIENTS), ("south", "south", PATIENTS)]
    # The native id stays queryable: in fhir_resource and the resource as sent, and in the key.
    assert con.sql(
        "SELECT source, resource->>'$.id' FROM fhir_resource "
        "WHERE resource_type = 'Patient' AND id = '7' ORDER BY 1"
    ).fetchall() == [("north", "7"), ("south", "7")]
    assert con.sql("SELECT id, family FROM patient WHERE id = 'south/7'").fetchall() == [
        ("south/7", "south-7")
    ]


def test_two_sources_with_the_same_ids_keep_their_own_resources(tmp_path: Path) -> None:
    north, south = hospital(tmp_path, "north"), hospital(tmp_path, "south")
    for source in (north, south, north, south):  # alternate: nothing changes after the first two
        report = sync(tmp_path / "store", source)
    assert (report.counts["inserted"], report.counts["updated"], report.counts["unchanged"]) == (0, 0, 600)
    assert_both_hospitals_kept(tmp_path / "store")


def test_an_older_hospital_still_lands_beside_a_newer_one(tmp_path: Path) -> None:
    """With meta.lastUpdated, the older file is not 'unchanged' against the other source's copy."""
    sync(tmp_path / "store", hospital(tmp_path, "north", "2024-06-01T00:00:00Z"))
    report = sync(tmp_path / "store", hospital(tmp_path, "south", "2020-01-01T00:00:00Z"))
    assert report.counts["inserted"] == 2 * PATIENTS
    assert_both_hospitals_kept(tmp_path / "store")


def test_a_deletion_in_one_source_leaves_the_others_resource(tmp_path: Path) -> None:
    north, south = hospital(tmp_path, "north"), hospital(tmp_path, "south")
    sync(tmp_path / "store", north)
    sync(tmp_path / "store", south)
    deleted = {
        "resource_type": "Patient",
        "id": "7",
        "deleted_at": datetime(2030, 1, 1, tzinfo=UTC),
        "origin": "test",
    }
    gone = pa.Table.from_pylist([deleted], DELETION_SCHEMA)
    with TwinStore(tmp_path / "store") as st:
        run = st.begin_run("south", "sync")
        batch = Batch(records=RECORD_SCHEMA.empty_table(), watermark={}, deletions=gone)
        land_batches(st, run, iter([batch]))
        st.finish_run(run, "succeeded")
    con = connect(tmp_path / "store")
    assert con.sql(
        "SELECT source FROM fhir_resource WHERE resource_type = 'Patient' AND id = '7'"
    ).fetchall() == [("north",)]
    assert con.sql("SELECT id FROM patient WHERE id LIKE '%/7'").fetchall() == [("north/7",)]
    assert con.sql("SELECT count(*) FROM patient").fetchone() == (2 * PATIENTS - 1,)
    # Read again, north's Patient 7 is unchanged, not deleted by south's tombstone.
    report = sync(tmp_path / "store", north)
    assert (report.counts["unchanged"], report.counts["superseded"]) == (2 * PATIENTS, 0)


def ehr_with_jane(folder: Path, name: str, mrn: str) -> FhirNdjsonSource:
    """An EHR whose Patient `jane` has the MRN `mrn`: two EHRs share the id, not the patient."""
    patient = {"resourceType": "Patient", "id": "jane", "identifier": [{"system": MRN, "value": mrn}]}
    path = write_ndjson(folder / name / "Patient.ndjson", [patient])
    return FhirNdjsonSource(name=name, kind="fhir-ndjson", path=path.parent)


@pytest.mark.parametrize("patient_first", [True, False])
def test_a_lab_result_links_to_the_patient_of_the_source_with_its_mrn(
    tmp_path: Path, patient_first: bool
) -> None:
    land(tmp_path / "store", ehr_with_jane(tmp_path, "north", "M-1"))
    south, labs = (
        ehr_with_jane(tmp_path, "south", "M-7"),
        lab_feed(tmp_path, MESSAGE.replace("MRN123", "M-7")),
    )
    for source in (south, labs) if patient_first else (labs, south):
        land(tmp_path / "store", source)
    con = connect(tmp_path / "store")
    assert con.sql("SELECT id FROM patient ORDER BY id").fetchall() == [("north/jane",), ("south/jane",)]
    assert con.sql("SELECT DISTINCT patient_id FROM observation").fetchall() == [("south/jane",)]
    assert con.sql("SELECT DISTINCT patient_id FROM diagnostic_report").fetchall() == [("south/jane",)]
    # The labs keep their own identity: their key is theirs, their subject names south's Patient.
    (subject,) = con.sql(LAB_SUBJECTS).fetchone() or (None,)
    assert subject == f"{SOURCE_BASE}south/Patient/jane"
    assert con.sql("SELECT count(*) FROM observation WHERE id NOT LIKE 'labs/%'").fetchone() == (0,)


def test_a_store_of_plain_ids_migrates_on_its_next_write(tmp_path: Path) -> None:
    """A store as twinhub wrote it before resources were known by source (view keys, patient-id
    columns and linked subjects by plain id), made from a current one by SQL: its next writer
    brings it to the rule in one go, nothing lost, and a second open changes nothing."""
    store = tmp_path / "store"
    land(store, ehr_with_jane(tmp_path, "ehr", "M-7"))
    land(store, lab_feed(tmp_path, MESSAGE.replace("MRN123", "M-7")))
    with TwinStore(store) as st, st.transaction("as an earlier twinhub left it"):
        con = st.con
        con.execute(
            f"""UPDATE twin.fhir_resource
            SET resource = replace(resource, '"reference":"{SOURCE_BASE}ehr/Patient/jane"',
                                   '"reference":"Patient/jane"')"""
        )
        for (table,) in con.execute(
            "SELECT DISTINCT table_name FROM duckdb_columns() "
            "WHERE database_name = 'twin' AND column_name = 'id'"
            " AND table_name NOT IN ('fhir_resource', 'fhir_deletion', 'held_resource')"
        ).fetchall():
            columns = {
                c
                for (c,) in con.execute(
                    f"SELECT column_name FROM duckdb_columns() WHERE table_name = '{table}'"
                ).fetchall()
            }
            plain = ", ".join(
                f"{c} = split_part({c}, '/', -1)"
                for c in ("id", "patient_id", "encounter_id")
                if c in columns
            )
            con.execute(f"UPDATE twin.{table} SET {plain}")
            con.execute(f"COMMENT ON TABLE twin.{table} IS 'an earlier definition'")
        con.execute(
            "INSERT INTO twin.model_output (model, patient_id, status) "
            "VALUES ('m', 'jane', 'ok'), ('m', 'alice', 'ok')"
        )
        con.execute(
            "INSERT INTO twin.wearable_sample (source, patient_id, metric, value) "
            "VALUES ('watch', 'jane', 'steps', 1), ('watch', 'alice', 'steps', 2)"
        )
    old = connect(store)
    assert old.sql("SELECT DISTINCT patient_id FROM observation").fetchall() == [("jane",)]
    before = old.sql(
        "SELECT source, resource_type, id, version_id FROM fhir_resource ORDER BY ALL"
    ).fetchall()
    old.close()

    def contents() -> dict[str, object]:
        con = connect(store)
        return {
            "resources": con.sql(
                "SELECT source, resource_type, id, version_id FROM fhir_resource ORDER BY ALL"
            ).fetchall(),
            "patients": con.sql("SELECT id FROM patient").fetchall(),
            "observed": con.sql("SELECT DISTINCT patient_id FROM observation").fetchall(),
            "reported": con.sql("SELECT DISTINCT patient_id FROM diagnostic_report").fetchall(),
            "subjects": con.sql(LAB_SUBJECTS).fetchall(),
            "outputs": con.sql("SELECT patient_id FROM model_output ORDER BY 1").fetchall(),
            "worn": con.sql("SELECT patient_id FROM wearable_sample ORDER BY 1").fetchall(),
            "identifiers": con.sql("SELECT id, value FROM patient_identifier").fetchall(),
        }

    TwinStore(store).close()  # the next writer
    migrated = contents()
    assert migrated == {
        "resources": before,
        "patients": [("ehr/jane",)],
        "observed": [("ehr/jane",)],
        "reported": [("ehr/jane",)],
        "subjects": [(f"{SOURCE_BASE}ehr/Patient/jane",)],
        "outputs": [("alice",), ("ehr/jane",)],  # alice: a twin no Patient names, left as it was
        "worn": [("ehr/jane",), ("watch/alice",)],  # alice: the wearable's own twin, as it names her now
        "identifiers": [("ehr/jane", "M-7")],
    }
    TwinStore(store).close()
    assert contents() == migrated


def two_hospitals(folder: Path, export: Path) -> Path:
    """A config of two fhir-ndjson sources with the same ids, different patients: north's sample
    export, and south's, the same export with every family name changed."""
    south = folder.parent / "south-export"
    if not south.exists():
        south.mkdir()
        for file in export.glob("*.ndjson.gz"):
            text = gzip.decompress(file.read_bytes()).replace(b'"family":"', b'"family":"South-')
            (south / file.name).write_bytes(gzip.compress(text, mtime=0))
    config = write_config(folder, export, name="north", batch_mb=1)
    with config.open("a") as f:
        f.write(f'\n[[sources]]\nname = "south"\nkind = "fhir-ndjson"\npath = "{south}"\nbatch_mb = 1\n')
    return config


def store_contents(store: Path) -> dict[str, list[tuple[object, ...]]]:
    con = connect(store)
    return {
        "fhir_resource": con.sql(
            "SELECT source, resource_type, id, version_id, content_hash FROM fhir_resource ORDER BY ALL"
        ).fetchall(),
        "observation": con.sql("SELECT * FROM observation ORDER BY ALL").fetchall(),
        "patient": con.sql("SELECT * FROM patient ORDER BY ALL").fetchall(),
        "quarantine": con.sql("SELECT source, file, line_no, reason FROM quarantine ORDER BY ALL").fetchall(),
    }


@pytest.mark.slow
def test_sigkill_mid_sync_of_a_second_source_sharing_ids_then_rerun_equals_a_clean_run(
    tmp_path: Path, api_env: dict[str, str]
) -> None:
    lines = sum(write_sample_export(tmp_path / "export", patients=600).values())
    clean = two_hospitals(tmp_path / "clean", tmp_path / "export")
    for name in ("north", "south"):
        assert run_cli("--config", str(clean), "sync", name, env=api_env, check=False).returncode in (0, 3)

    crashed = two_hospitals(tmp_path / "crashed", tmp_path / "export")
    assert run_cli("--config", str(crashed), "sync", "north", env=api_env, check=False).returncode in (0, 3)
    north_lines = (
        connect(tmp_path / "crashed" / "store").sql("SELECT sum(lines_read) FROM ingest_run").fetchone()
    )
    proc = subprocess.Popen(
        [TWINHUB, "--config", str(crashed), "sync", "south"],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **api_env},
    )
    assert north_lines is not None
    landed = wait_for_landed_lines(tmp_path / "crashed" / "store", proc, minimum=int(north_lines[0]) + 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    total = store_contents(tmp_path / "clean" / "store")
    assert landed < 2 * int(north_lines[0]), "the kill came after south had landed whole"
    assert run_cli("--config", str(crashed), "sync", "south", env=api_env, check=False).returncode in (0, 3)
    assert store_contents(tmp_path / "crashed" / "store") == total
    per_source = Counter(source for source, *_ in total["fhir_resource"])
    assert per_source == {"north": lines, "south": lines}, "each hospital keeps all of its own"


def heart_rate(patients: list[str]) -> Batch:
    """A wearable batch: one heart rate sample for each patient as the source's config names it."""
    rows = [
        {
            "patient_id": patient,
            "device": "watch",
            "metric": "heart_rate",
            "start_time": datetime(2024, 3, 1, 8, tzinfo=UTC),
            "value": 61.0,
            "unit": "bpm",
            "origin": "test",
        }
        for patient in patients
    ]
    return Batch(
        records=RECORD_SCHEMA.empty_table(), watermark={}, samples=pa.Table.from_pylist(rows, SAMPLE_SCHEMA)
    )


def test_a_wearable_names_its_patient_by_key_or_by_an_id_one_source_has(tmp_path: Path) -> None:
    store = tmp_path / "store"
    for name, patient in (("north", "jane"), ("south", "jane"), ("solo", "bob")):
        land(
            store, ehr_with_jane(tmp_path, name, "M-1") if patient == "jane" else ehr_with_bob(tmp_path, name)
        )
    with TwinStore(store) as st:
        run = st.begin_run("watch", "sync")
        land_batches(st, run, iter([heart_rate(["north/jane", "bob", "alice"])]))
        st.finish_run(run, "succeeded")
    con = connect(store)
    keys = [("north/jane",), ("solo/bob",), ("watch/alice",)]  # alice: no source has her, the watch's own
    assert con.sql("SELECT DISTINCT patient_id FROM wearable_sample ORDER BY 1").fetchall() == keys
    assert con.sql("SELECT DISTINCT patient_id FROM wearable_daily ORDER BY 1").fetchall() == keys
    # The daily Observations are the watch's, about those patients, and joined by their keys.
    assert con.sql(
        """SELECT w.patient_id, o.patient_id FROM wearable_daily w
        JOIN observation o ON o.id = w.observation_id ORDER BY 1"""
    ).fetchall() == [(k, k) for (k,) in keys]
    assert con.sql("SELECT count(*) FROM observation o JOIN patient p ON o.patient_id = p.id").fetchone() == (
        2,
    )

    with TwinStore(store) as st:
        run = st.begin_run("watch", "sync")
        with pytest.raises(ConfigError) as error:
            land_batches(st, run, iter([heart_rate(["jane"])]))
        st.finish_run(run, "failed", str(error.value))
    assert str(error.value) == (
        "config sources.watch: a patient named by a plain id is a Patient of several sources (north, south); "
        "name it by its key, <source>/<id>"
    )
    assert con.sql("SELECT count(*) FROM wearable_sample").fetchone() == (3,)


def ehr_with_bob(folder: Path, name: str) -> FhirNdjsonSource:
    path = write_ndjson(folder / name / "Patient.ndjson", [{"resourceType": "Patient", "id": "bob"}])
    return FhirNdjsonSource(name=name, kind="fhir-ndjson", path=path.parent)
