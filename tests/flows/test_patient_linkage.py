"""Lab messages that name their patient by MRN, through the real pipeline into a real store:
linked to the twin's Patient with that identifier, held until it arrives, never dropped."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from connectors.fhir.ndjson import FhirNdjsonConnector, FhirNdjsonSource
from connectors.genomics.vcf import VcfConnector
from connectors.labs.hl7v2 import Hl7v2Connector, Hl7v2Source
from flows.sync import harmonized, land_batches
from tests.support.cli import run_cli
from tests.support.data import write_ndjson
from tests.support.hl7v2 import MESSAGE
from twin_store import RunReport, TwinStore, Window, connect, prepare

MRN = "http://hospital.example.org/mrn"


def land(store: Path, source: Hl7v2Source | FhirNdjsonSource) -> RunReport:
    with TwinStore(store) as st:
        run = st.begin_run(source.name, "sync")
        if isinstance(source, Hl7v2Source):
            land_batches(st, run, harmonized(source, Hl7v2Connector(source).pull(None)))
        else:
            land_batches(st, run, FhirNdjsonConnector(source).pull(None))
        return st.finish_run(run, "succeeded")


def lab_feed(folder: Path, message: str) -> Hl7v2Source:
    """An HL7 v2 source whose results name their patient by the ACME MRN and make no Patient."""
    (folder / "in.hl7").write_text(message)
    return Hl7v2Source(
        name="labs",
        kind="hl7v2",
        path=folder / "in.hl7",
        patient_systems={"ACME": MRN},
        create_patients=False,
    )


def jane(folder: Path) -> FhirNdjsonSource:
    """The EHR's Patient with MRN M-7."""
    patient = {"resourceType": "Patient", "id": "jane", "identifier": [{"system": MRN, "value": "M-7"}]}
    return FhirNdjsonSource(name="ehr", kind="fhir-ndjson", path=write_ndjson(folder / "p.ndjson", [patient]))


@pytest.mark.parametrize("patient_first", [True, False])
def test_hl7_results_link_to_the_ehr_patient_with_their_mrn(tmp_path: Path, patient_first: bool) -> None:
    labs = lab_feed(tmp_path, MESSAGE.replace("MRN123", "M-7"))
    ehr = jane(tmp_path)
    first, second = (ehr, labs) if patient_first else (labs, ehr)
    land(tmp_path / "store", first)
    report = land(tmp_path / "store", second)
    con = connect(tmp_path / "store")
    assert con.sql("SELECT count(*) FROM patient").fetchone() == (1,), "no second Patient from PID"
    assert con.sql("SELECT DISTINCT patient_id FROM observation").fetchall() == [("jane",)]
    assert con.sql("SELECT count(*) FROM observation").fetchone() == (3,)
    assert con.sql("SELECT DISTINCT patient_id FROM diagnostic_report").fetchall() == [("jane",)]
    assert con.sql("SELECT count(*) FROM held_resource").fetchone() == (0,)
    if not patient_first:  # report, specimen and 3 observations waited, then came with Jane
        assert (report.counts["released"], report.counts["inserted"]) == (5, 6)
        held = con.sql("SELECT sum(held) FROM ingest_run WHERE source = 'labs'").fetchone()
        assert held == (5,)


def test_status_shows_results_waiting_for_their_patient(tmp_path: Path) -> None:
    land(tmp_path / "store", lab_feed(tmp_path, MESSAGE))
    (tmp_path / "twinhub.toml").write_text(
        f'[store]\npath = "{tmp_path / "store"}"\n[[sources]]\nname = "labs"\nkind = "hl7v2"\n'
        f'path = "{tmp_path / "in.hl7"}"\ncreate_patients = false\npatient_systems = {{ ACME = "{MRN}" }}\n'
    )
    status = run_cli("--config", str(tmp_path / "twinhub.toml"), "status", env={"COLUMNS": "250"}).stdout
    assert "Waiting for their patient" in status
    (waiting,) = [line for line in status.splitlines() if "FHIR resources" in line]
    assert waiting.strip().startswith(
        f"labs: 5 FHIR resources for 1 patient (identifier system {MRN}), since "
    )


def test_variant_calls_of_a_sample_named_by_mrn_link_when_the_patient_arrives(tmp_path: Path) -> None:
    from connectors.genomics.vcf import VcfReportable, VcfSource
    from tests.support.vcf import RECORDS, write_vcf

    genome = VcfSource(
        name="seq",
        kind="vcf",
        path=write_vcf(tmp_path / "calls.vcf", RECORDS),
        samples={"S1": "M-7"},
        patient_system=MRN,
        reportable=VcfReportable(genes=["APC"]),
    )
    with TwinStore(tmp_path / "store") as st:
        run = st.begin_run("seq", "sync")
        land_batches(st, run, harmonized(genome, VcfConnector(genome).pull(None)))
        st.finish_run(run, "succeeded")
    # S1's three calls all lie in APC: three variant Observations and a report wait; S2 has no
    # patient at all, so its two reportable calls are quarantined with that reason.
    assert (run.counts["inserted"], run.counts["held"], run.counts["quarantined"]) == (5, 4, 2)
    con = connect(tmp_path / "store")
    assert con.sql(
        "SELECT sample, patient_id, patient_identifier, count(*) FROM genomic_variant GROUP BY ALL ORDER BY 1"
    ).fetchall() == [("S1", None, f"{MRN}|M-7", 3), ("S2", None, None, 2)]
    status = con.sql("SELECT count(*) FROM held_resource").fetchone()
    assert status == (4,), "the variant Observations and their report wait for the patient"
    con.close()

    report = land(tmp_path / "store", jane(tmp_path))
    assert report.counts["released"] == 4, "the 4 resources land; the 3 calls get their patient"
    con = connect(tmp_path / "store")
    assert con.sql("SELECT sample, patient_id FROM genomic_variant GROUP BY ALL ORDER BY 1").fetchall() == [
        ("S1", "jane"),
        ("S2", None),
    ]
    assert con.sql("SELECT patient_id FROM diagnostic_report").fetchall() == [("jane",)]
    assert con.sql("SELECT patient_id, code FROM observation").fetchall() == [("jane", "69548-6")] * 3


# -- edge cases (each lost or misplaced a record before it was fixed) ----------------------------


def lab(
    subject: dict[str, object], updated: str = "2021-01-01T00:00:00Z", value: int = 60
) -> dict[str, object]:
    return {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "meta": {"lastUpdated": updated},
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": subject,
        "effectiveDateTime": "2020-01-01T00:00:00Z",
        "valueQuantity": {"value": value},
    }


def land_files(
    store: Path, name: str, lines: list[dict[str, object]], window: Window | None = None
) -> RunReport:
    folder = store.parent / name
    write_ndjson(folder / "data.ndjson", lines)
    source = FhirNdjsonSource(name=name, kind="fhir-ndjson", path=folder)
    with TwinStore(store) as st:
        run = st.begin_run(name, "backfill" if window else "sync")
        for batch in FhirNdjsonConnector(source).pull(None):
            st.land(run, prepare(batch, backfill=window is not None), window=window)
        return st.finish_run(run, "succeeded")


BY_MRN = {"identifier": {"system": MRN, "value": "M-7"}}
JANE = {"resourceType": "Patient", "id": "jane", "identifier": [{"system": MRN, "value": "M-7"}]}


def test_a_backfill_that_brings_the_patient_lands_its_held_results_whatever_the_window(
    tmp_path: Path,
) -> None:
    land_files(tmp_path / "store", "labs", [lab(BY_MRN)])
    window = Window(since=datetime(1980, 1, 1, tzinfo=UTC), until=datetime(2000, 1, 1, tzinfo=UTC))
    report = land_files(tmp_path / "store", "ehr", [{**JANE, "birthDate": "1990-05-01"}], window)
    assert report.counts["released"] == 1
    con = connect(tmp_path / "store")
    assert con.sql("SELECT id, patient_id FROM observation").fetchall() == [("o1", "jane")]
    assert con.sql("SELECT count(*) FROM held_resource").fetchone() == (0,)


def test_an_older_copy_does_not_replace_a_newer_one_that_waits(tmp_path: Path) -> None:
    land_files(tmp_path / "store", "labs", [lab(BY_MRN, "2021-06-01T00:00:00Z", 99)])
    replay = land_files(tmp_path / "store", "replay", [lab(BY_MRN, "2020-06-01T00:00:00Z", 60)])
    assert (replay.counts["held"], replay.counts["superseded"]) == (0, 1)
    land_files(tmp_path / "store", "ehr", [JANE])
    con = connect(tmp_path / "store")
    assert con.sql("SELECT value_numeric, patient_id FROM observation").fetchall() == [(99.0, "jane")]


def test_a_patient_that_takes_an_identifier_over_in_the_batch_gets_the_result(tmp_path: Path) -> None:
    amy = {"resourceType": "Patient", "id": "amy", "identifier": [{"system": MRN, "value": "M-7"}]}
    land_files(tmp_path / "store", "ehr", [amy])
    moved = {**amy, "identifier": [{"system": MRN, "value": "M-8"}]}
    land_files(tmp_path / "store", "ehr2", [moved, {**JANE, "id": "zed"}, lab(BY_MRN)])
    con = connect(tmp_path / "store")
    assert con.sql("SELECT patient_id FROM observation").fetchall() == [("zed",)]


def test_a_contained_subject_by_identifier_is_left_alone(tmp_path: Path) -> None:
    """The resource itself has no `subject` (an Immunization names its `patient`)."""
    contained = {**lab(BY_MRN), "id": "inner"}
    outer = {
        "resourceType": "Immunization",
        "id": "i1",
        "status": "completed",
        "contained": [contained],
        "vaccineCode": {"text": "flu"},
        "patient": {"reference": "Patient/jane"},
        "occurrenceDateTime": "2020-01-01",
    }
    report = land_files(tmp_path / "store", "ehr", [JANE, outer])
    assert (report.counts["inserted"], report.counts["held"]) == (2, 0)
    con = connect(tmp_path / "store")
    assert con.sql("SELECT patient_id FROM immunization").fetchall() == [("jane",)]
