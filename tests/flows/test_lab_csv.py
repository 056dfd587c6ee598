"""Lab CSV exports through the real pipeline into a real store: mapping, quarantine, resume."""

from __future__ import annotations

import gzip
from decimal import Decimal
from pathlib import Path

import pytest
from orjson import loads as orjson_loads

from connectors.errors import SourceError
from connectors.labs.lab_csv import LabCsvColumns, LabCsvConnector, LabCsvSource
from flows.sync import harmonized, land_batches
from harmonize.sql_on_fhir.fhirpath import SOURCE_BASE
from tests.support.data import SHARED, SYNTHEA
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
        ("lab/p1", "14749-6", Decimal("5.5"), "mmol/L", None),
        ("lab/p1", "718-7", Decimal("13.9"), "g/dL", None),
        ("lab/p2", "5767-9", None, None, "cloudy"),
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
    """The results arrive first, naming patients by MRN: all wait. The Synthea patients land
    next and every result links to its patient; none is orphaned or lost."""
    if not (LAB_CSV.exists() and SYNTHEA.is_dir()):
        pytest.skip(f"shared lab CSV or Synthea set not found under {SHARED}")
    from connectors.fhir.ndjson import FhirNdjsonConnector, FhirNdjsonSource

    mrn_system = "http://hospital.smarthealthit.org"
    mrn_of = {}
    with gzip.open(SYNTHEA / "Patient.ndjson.gz") as lines:
        for line in lines:
            patient = orjson_loads(line)
            (mrn,) = [i["value"] for i in patient["identifier"] if i.get("system") == mrn_system]
            mrn_of[patient["id"]] = mrn
    header, *rows = gzip.decompress(LAB_CSV.read_bytes()).decode().strip().split("\n")
    by_mrn = [f"{r.split(',', 2)[0]},{mrn_of[r.split(',', 2)[1]]},{r.split(',', 2)[2]}" for r in rows]
    (tmp_path / "labs.csv").write_text("\n".join([header, *by_mrn]) + "\n")
    columns = LabCsvColumns(
        id="observation_id",
        patient="patient_id",
        encounter="encounter_id",
        time="effective_datetime",
        issued="issued",
        status="status",
        code="loinc_code",
        display="loinc_display",
        value="value_numeric",
        unit="value_unit_ucum",
        ucum="value_unit_ucum",
        value_code="value_coded_code",
        value_code_system="value_coded_system",
        value_code_display="value_coded_display",
    )
    source = LabCsvSource(
        name="labs", kind="lab-csv", path=tmp_path / "labs.csv", columns=columns, patient_system=mrn_system
    )
    report = sync(tmp_path / "store", source)
    assert len(rows) == 54_953
    assert (report.counts["held"], report.counts["inserted"], report.counts["quarantined"]) == (54_953, 0, 0)

    with TwinStore(tmp_path / "store") as st:
        run = st.begin_run("synthea", "sync")
        synthea = FhirNdjsonSource(name="synthea", kind="fhir-ndjson", path=SYNTHEA)
        land_batches(st, run, FhirNdjsonConnector(synthea).pull(None))
        assert run.counts["released"] == 54_953
    con = connect(tmp_path / "store")
    linked = con.sql(
        """SELECT count(*), count(p.id), count(DISTINCT l.patient_id) FROM lab_result l
        LEFT JOIN patient p ON p.id = l.patient_id
        WHERE l.id IN (SELECT 'labs/' || id FROM fhir_resource WHERE source = 'labs')"""
    ).fetchone()
    assert linked == (54_953, 54_953, 615), "every lab row belongs to a Synthea patient"
    assert con.sql("SELECT count(*) FROM held_resource").fetchone() == (0,)
    same_patient = con.sql(
        """SELECT count(*) FROM fhir_resource r
        JOIN lab_result l ON l.id = r.source || '/' || r.id
        JOIN lab_result synthea ON synthea.id = 'synthea/' || (r.resource->>'$.identifier[0].value')
        WHERE r.source = 'labs' AND l.patient_id = synthea.patient_id"""
    ).fetchone()
    assert same_patient == (54_953,), "each result links to the patient of the Synthea original"


def test_results_named_by_mrn_wait_for_their_patient_and_link_when_it_arrives(tmp_path: Path) -> None:
    from connectors.fhir.ndjson import FhirNdjsonConnector, FhirNdjsonSource
    from tests.support.data import write_ndjson

    mrn = "urn:oid:1.2.36.146.595.217.0.1"

    def patients(*pairs: tuple[str, str]) -> None:
        path = write_ndjson(
            tmp_path / f"patients-{pairs[0][0]}.ndjson",
            [
                {"resourceType": "Patient", "id": pid, "identifier": [{"system": mrn, "value": v}]}
                for pid, v in pairs
            ],
        )
        with TwinStore(tmp_path / "store") as st:
            run = st.begin_run(path.stem, "sync")
            land_batches(
                st,
                run,
                FhirNdjsonConnector(FhirNdjsonSource(name=path.stem, kind="fhir-ndjson", path=path)).pull(
                    None
                ),
            )
            st.finish_run(run, "succeeded")

    rows = [
        "a1,M1,718-7,2024-03-01T08:30:00Z,13.9,g/dL",
        "a2,M2,718-7,2024-03-01T08:30:00Z,12.1,g/dL",
        "a3,M2,2345-7,2024-03-01T08:30:00Z,5.5,mmol/L",
    ]
    (tmp_path / "labs.csv").write_text(HEADER + "\n".join(rows) + "\n")
    source = LabCsvSource(
        name="lab", kind="lab-csv", path=tmp_path / "labs.csv", columns=COLUMNS, patient_system=mrn
    )
    patients(("pat-1", "M1"))
    first = sync(tmp_path / "store", source)
    assert (first.counts["inserted"], first.counts["held"]) == (1, 2)
    con = connect(tmp_path / "store")
    # Each Patient is its file's source's (`patients-pat-1`): its key names that source.
    assert con.sql("SELECT patient_id FROM lab_result").fetchall() == [("patients-pat-1/pat-1",)]
    assert con.sql("SELECT link_value, count(*) FROM held_resource GROUP BY 1").fetchall() == [("M2", 2)]
    con.close()

    patients(("pat-2", "M2"), ("pat-3", "M3"))  # the patient arrives: its results land with it
    con = connect(tmp_path / "store")
    assert con.sql("SELECT released FROM ingest_run WHERE source = 'patients-pat-2'").fetchall() == [(2,)]
    assert con.sql("SELECT patient_id, code FROM lab_result ORDER BY ALL").fetchall() == [
        ("patients-pat-1/pat-1", "718-7"),
        ("patients-pat-2/pat-2", "2345-7"),
        ("patients-pat-2/pat-2", "718-7"),
    ]
    assert con.sql("SELECT count(*) FROM held_resource").fetchall() == [(0,)]
    subject = con.sql(
        "SELECT resource::JSON->'subject', source FROM fhir_resource WHERE source || '/' || id IN "
        "(SELECT id FROM lab_result WHERE patient_id = 'patients-pat-2/pat-2') LIMIT 1"
    ).fetchone()
    assert subject is not None and orjson_loads(subject[0]) == {
        "reference": f"{SOURCE_BASE}patients-pat-2/Patient/pat-2",
        "identifier": {"system": mrn, "value": "M2"},
    }
    assert subject[1] == "lab", "a released result keeps the source that read it"
    con.close()

    (tmp_path / "again.csv").write_text(HEADER + "\n".join(rows) + "\n")  # the same results again
    again = sync(tmp_path / "store", source.model_copy(update={"path": tmp_path / "again.csv"}))
    assert (again.counts["unchanged"], again.counts["inserted"], again.counts["held"]) == (3, 0, 0)


LOCAL_HEADER = "id,patient,system,code,name,when,value,unit,low,high\n"
LOCAL_ROWS = [
    "b1,p1,urn:acme:lab-codes,1001,Glucose,2024-03-01T08:30:00Z,5.50,mmol/l,3.9,5.5",  # mapped, converted
    "b2,p1,urn:acme:lab-codes,2002,Ferritin,2024-03-01T08:30:00Z,35,ng/mL,,",  # not in the map
    "b3,p1,http://loinc.org,718-7,Hemoglobin,2024-03-01T08:30:00Z,13.9,g/dl,,",  # LOINC, unit respelled
]
LOCAL_CONFIG = """[store]
path = "store"

[[sources]]
name = "acme"
kind = "lab-csv"
path = "labs.csv"
concept_map = "{concept_map}"

[sources.columns]
id = "id"
patient = "patient"
code_system = "system"
code = "code"
display = "name"
time = "when"
value = "value"
unit = "unit"
reference_low = "low"
reference_high = "high"
"""


def test_local_codes_map_through_the_concept_map_and_unmapped_ones_are_queryable(tmp_path: Path) -> None:
    from flows.sync import land_source

    (tmp_path / "labs.csv").write_text(LOCAL_HEADER + "\n".join(LOCAL_ROWS) + "\n")
    example = Path(__file__).parents[2] / "examples" / "lab-codes-conceptmap.json"
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "acme.json").write_bytes(example.read_bytes())
    (tmp_path / "twinhub.toml").write_text(LOCAL_CONFIG.format(concept_map="maps/acme.json"))
    report = land_source.fn(str(tmp_path / "twinhub.toml"), "acme")  # the sync flow's own task
    assert (report.counts["inserted"], report.counts["quarantined"]) == (3, 0)
    assert report.stats == {"files": 1, "codes mapped": 1, "codes unmapped": 1, "values converted": 1}
    con = connect(tmp_path / "store")
    assert con.sql(
        "SELECT code, code_system, value_numeric, value_unit, value_ucum FROM lab_result ORDER BY code"
    ).fetchall() == [
        ("2002", "urn:acme:lab-codes", Decimal("35"), "ng/mL", "ng/mL"),
        ("2345-7", "http://loinc.org", Decimal("99.1"), "mg/dL", "mg/dL"),
        ("718-7", "http://loinc.org", Decimal("13.9"), "g/dl", "g/dL"),
    ]
    assert con.sql("SELECT code FROM observation ORDER BY code").fetchall() == [
        ("2002",),
        ("2345-7",),
        ("718-7",),
    ]
    unmapped = con.sql(
        """SELECT json_extract_string(resource, '$.code.coding[0].code') FROM fhir_resource
        WHERE resource_type = 'Observation' AND list_contains(
            json_extract_string(resource, '$.meta.tag[*].code'), 'unmapped-code')"""
    ).fetchall()
    assert unmapped == [("2002",)]
    original = con.sql(
        """SELECT json_extract_string(resource, '$.code.coding[1].code'),
            json_extract_string(resource, '$.valueQuantity.extension[0].valueQuantity.unit'),
            contains(resource, '"valueQuantity":{"value":5.50,')
        FROM fhir_resource WHERE json_extract_string(resource, '$.code.coding[0].code') = '2345-7'"""
    ).fetchall()
    assert original == [("1001", "mmol/l", True)], "the local coding and the value as sent are kept"


@pytest.mark.parametrize(
    ("concept_map", "message"),
    [
        ("missing.json", "cannot read '{file}' (No such file or directory); point it at a FHIR ConceptMap"),
        ("bad.json", "'{file}' is not a valid FHIR R4 ConceptMap: group.0.element.0.target.0.equivalence"),
    ],
)
def test_a_bad_concept_map_fails_the_sync_before_anything_lands(
    tmp_path: Path, concept_map: str, message: str
) -> None:
    from connectors.errors import ConfigError
    from flows.sync import land_source

    (tmp_path / "labs.csv").write_text(LOCAL_HEADER + "\n".join(LOCAL_ROWS) + "\n")
    (tmp_path / "bad.json").write_text(
        '{"resourceType": "ConceptMap", "status": "active", "group": [{"target": "http://loinc.org",'
        ' "element": [{"code": "1001", "target": [{"code": "2345-7"}]}]}]}'
    )
    (tmp_path / "twinhub.toml").write_text(LOCAL_CONFIG.format(concept_map=concept_map))
    with pytest.raises(ConfigError) as caught:
        land_source.fn(str(tmp_path / "twinhub.toml"), "acme")
    text = str(caught.value)
    assert text.startswith("config sources.acme.concept_map: ") and "\n" not in text
    assert message.format(file=tmp_path / concept_map) in text
    assert connect(tmp_path / "store").sql("SELECT count(*) FROM fhir_resource").fetchone() == (0,)
