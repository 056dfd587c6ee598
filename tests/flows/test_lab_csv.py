"""Lab CSV exports through the real pipeline into a real store: mapping, quarantine, resume."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from connectors.errors import SourceError
from connectors.lab_csv import LabCsvColumns, LabCsvConnector, LabCsvSource
from flows.sync import harmonized, land_batches
from tests.conftest import SHARED, SYNTHEA
from twin_store import RunReport, TwinStore, connect

COLUMNS = LabCsvColumns(id="id", patient="patient", code="loinc", time="when", value="value", ucum="unit")
HEADER = "id,patient,loinc,when,value,unit\n"
ROWS = [
    "a1,p1,14749-6,2024-03-01T08:30:00+01:00,5.50,mmol/L",
    "a2,p1,718-7,2024-03-01T08:30:00+01:00,13.9,g/dL",
    "a3,,718-7,2024-03-02T08:30:00Z,14.1,g/dL",  # no patient
    "a4,p2,718-7,yesterday,12.0,g/dL",  # not a dateTime
    'a5,p2,"5767-9","2024-03-03T09:00:00Z","cloudy",',  # text value, quoted
]


def sync(store: Path, source: LabCsvSource, *, batches: int | None = None) -> RunReport:
    with TwinStore(store) as st:
        run = st.begin_run(source.name, "sync")
        pulled = LabCsvConnector(source).pull(st.watermark(source.name))
        if batches is not None:  # stop early, as a crash after that many batches would
            pulled = (b for _, b in zip(range(batches), pulled, strict=False))
        land_batches(st, run, harmonized(source, pulled))
        return st.finish_run(run, "succeeded")


def test_rows_land_as_observations_and_bad_rows_are_quarantined_with_reasons(tmp_path: Path) -> None:
    (tmp_path / "labs.csv").write_text(HEADER + "\n".join(ROWS) + "\n")
    source = LabCsvSource(name="lab", kind="lab-csv", path=tmp_path / "labs.csv", columns=COLUMNS)
    report = sync(tmp_path / "store", source)
    assert (report.counts["lines_read"], report.counts["inserted"], report.counts["quarantined"]) == (5, 3, 2)
    con = connect(tmp_path / "store")
    assert con.sql(
        "SELECT patient_id, code, value_numeric, value_ucum, value_string FROM lab_result ORDER BY ALL"
    ).fetchall() == [
        ("p1", "14749-6", 5.5, "mmol/L", None),
        ("p1", "718-7", 13.9, "g/dL", None),
        ("p2", "5767-9", None, None, "cloudy"),
    ]
    reasons = dict(con.sql("SELECT line_no, reason FROM quarantine ORDER BY 1").fetchall())
    assert reasons[4] == "no patient (column 'patient' is empty)"
    assert reasons[5].startswith("not a valid FHIR Observation: effectiveDateTime")
    assert sync(tmp_path / "store", source).counts["lines_read"] == 0, "an unchanged file is not read again"


def test_a_sync_cut_short_resumes_after_the_last_landed_row(tmp_path: Path) -> None:
    lines = [f"r{i},p{i % 7},718-7,2024-01-{1 + i % 28:02d}T10:00:00Z,{10 + i / 10},g/dL" for i in range(500)]
    (tmp_path / "labs.csv").write_text(HEADER + "\n".join(lines) + "\n")
    source = LabCsvSource(
        name="lab", kind="lab-csv", path=tmp_path / "labs.csv", columns=COLUMNS, batch_rows=120
    )
    first = sync(tmp_path / "store", source, batches=2)
    rest = sync(tmp_path / "store", source)
    assert (first.counts["inserted"], rest.counts["inserted"], rest.counts["unchanged"]) == (240, 260, 0)
    (n, distinct) = (
        connect(tmp_path / "store").sql("SELECT count(*), count(DISTINCT id) FROM lab_result").fetchone()
        or ()
    )
    assert n == distinct == 500


def test_a_column_missing_from_the_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "labs.csv").write_text("id,patient,code,when\n")
    source = LabCsvSource(name="lab", kind="lab-csv", path=tmp_path / "labs.csv", columns=COLUMNS)
    with pytest.raises(
        SourceError, match=r"has no column for code = 'loinc', ucum = 'unit', value = 'value'"
    ):
        LabCsvConnector(source).check()


LAB_CSV = SHARED / "labs" / "csv" / "synthea-r4-lab-results-derived.csv.gz"


@pytest.mark.slow
@pytest.mark.shared
def test_the_shared_lab_csv_lands_every_row_linked_to_a_synthea_patient(tmp_path: Path) -> None:
    if not (LAB_CSV.exists() and SYNTHEA.is_dir()):
        pytest.skip(f"shared lab CSV or Synthea set not found under {SHARED}")
    from connectors.fhir_ndjson import FhirNdjsonConnector, FhirNdjsonSource

    with TwinStore(tmp_path / "store") as st:
        run = st.begin_run("synthea", "sync")
        land_batches(
            st,
            run,
            FhirNdjsonConnector(FhirNdjsonSource(name="synthea", kind="fhir-ndjson", path=SYNTHEA)).pull(
                None
            ),
        )
    columns = LabCsvColumns(
        id="observation_id", patient="patient_id", encounter="encounter_id", time="effective_datetime",
        issued="issued", status="status", code="loinc_code", display="loinc_display", value="value_numeric",
        unit="value_unit_ucum", ucum="value_unit_ucum", value_code="value_coded_code",
        value_code_system="value_coded_system", value_code_display="value_coded_display",
    )  # fmt: skip
    report = sync(
        tmp_path / "store", LabCsvSource(name="labs", kind="lab-csv", path=LAB_CSV, columns=columns)
    )
    rows = gzip.decompress(LAB_CSV.read_bytes()).decode().strip().count("\n")
    assert report.counts["inserted"] == rows == 54_953 and report.counts["quarantined"] == 0
    linked = (
        connect(tmp_path / "store")
        .sql(
            """SELECT count(*), count(p.id), count(DISTINCT l.patient_id) FROM lab_result l
        LEFT JOIN patient p ON p.id = l.patient_id
        WHERE l.id IN (SELECT id FROM fhir_resource WHERE source = 'labs')"""
        )
        .fetchone()
    )
    assert linked == (54_953, 54_953, 615), "every lab row belongs to a Synthea patient"
