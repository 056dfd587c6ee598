"""An hl7v2 source with a ConceptMap, through the sync task into a real store: the same code and
unit normalization as the lab CSV path (tests/flows/test_lab_csv.py)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from flows.sync import land_source
from twin_store import connect

EXAMPLE = Path(__file__).parents[2] / "examples" / "lab-codes-conceptmap.json"
MESSAGE = "\r".join(
    [
        "MSH|^~\\&|LAB|ACME||TWIN|20240301093000+0100||ORU^R01^ORU_R01|MSG001|P|2.5.1",
        "PID|1||MRN123^^^ACME^MR||Doe^Jane||19800214|F",
        "OBR|1|PL1|FL1|24331-1^Lipid panel^LN|||20240301083000+0100",
        "OBX|1|NM|CHOL^Cholesterol^L||5.20|mmol/L^mmol/L^UCUM|<5.2||||F",
        "OBX|2|NM|FERR^Ferritin^L||35|ng/ml|||||F",
        "OBX|3|NM|718-7^Hemoglobin^LN||139|g/l-1|||||F",
        "OBX|4|NM|789-8^Erythrocytes^LN||4.5|T/l^tera per litre^ISO+|||||F",
        "OBX|5|NM|26464-8^Leukocytes^LN||6.1|Tsd/ul|||||F",
    ]
)


def test_hl7_local_codes_map_and_units_normalize_into_the_views(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "oru.hl7").write_text(MESSAGE + "\r")
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "acme.json").write_bytes(EXAMPLE.read_bytes())
    (tmp_path / "twinhub.toml").write_text(
        '[store]\npath = "store"\n\n[[sources]]\nname = "feed"\nkind = "hl7v2"\npath = "inbox"\n'
        'concept_map = "maps/acme.json"\n'
    )
    report = land_source.fn(str(tmp_path / "twinhub.toml"), "feed")
    assert report.stats == {
        "files": 1,
        "messages": 1,
        "codes mapped": 1,
        "values converted": 1,
        "codes unmapped": 1,
        "units not UCUM": 1,
    }
    con = connect(tmp_path / "store")
    assert con.sql(
        "SELECT code, value_numeric, value_unit, value_ucum FROM lab_result ORDER BY code"
    ).fetchall() == [
        ("2093-3", Decimal("201"), "mg/dL", "mg/dL"),  # CHOL -> LOINC, 5.20 mmol/L -> mg/dL (386.65 g/mol)
        ("26464-8", Decimal("6.1"), "Tsd/ul", None),  # neither UCUM nor listed: kept as text, flagged
        ("718-7", Decimal("139"), "g/l-1", "g/L"),
        (
            "789-8",
            Decimal("4.5"),
            "tera per litre",
            "10*12/L",
        ),  # OBX-6.1 T/l: listed (as UCUM, tesla per litre)
        ("FERR", Decimal("35"), "ng/ml", "ng/mL"),
    ]
    flagged = con.sql(
        """SELECT json_extract_string(resource, '$.code.coding[0].code') AS code,
            json_extract_string(resource, '$.meta.tag[*].code') AS tags
        FROM fhir_resource WHERE resource_type = 'Observation' AND resource LIKE '%urn:twinhub:tag%'
        ORDER BY code"""
    ).fetchall()
    assert flagged == [("26464-8", ["unknown-unit"]), ("FERR", ["unmapped-code"])]
    (text,) = con.sql(
        """SELECT json_extract_string(resource, '$.referenceRange[0].text') FROM fhir_resource
        WHERE json_extract_string(resource, '$.code.coding[0].code') = '2093-3'"""
    ).fetchone() or (None,)
    assert text == "<201 mg/dL", "the range converts with the value"
