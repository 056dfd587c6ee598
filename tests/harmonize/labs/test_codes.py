"""Local codes through a ConceptMap, units to UCUM and per-LOINC value conversion, the same for
lab CSV rows and HL7 v2 OBX segments."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B.observation import Observation

from connectors.base import Batch, records_from
from connectors.labs.lab_csv import LabCsvColumns, LabCsvSource
from harmonize.labs.codes import (
    ORIGINAL_QUANTITY,
    CodeMap,
    code_map_from_json,
    normalize_observation,
    ucum_code,
)
from harmonize.labs.hl7v2 import message_resources
from harmonize.labs.rows import observation, observations_from_rows

LOCAL = "urn:twinhub:hl7v2:codesystem:L"
UNMAPPED = {"system": "urn:twinhub:tag", "code": "unmapped-code", "display": "Code not mapped to LOINC"}
UNKNOWN_UNIT = {"system": "urn:twinhub:tag", "code": "unknown-unit", "display": "Unit not UCUM"}


def concept_map(*elements: dict[str, Any], source: str | None = LOCAL, **extra: Any) -> bytes:
    group: dict[str, Any] = {"target": "http://loinc.org", "element": list(elements)}
    group |= {"source": source} if source else {}
    return orjson.dumps({"resourceType": "ConceptMap", "status": "active", "group": [group], **extra})


def element(code: str, target: str, equivalence: str = "equivalent") -> dict[str, Any]:
    return {
        "code": code,
        "target": [{"code": target, "display": f"LOINC {target}", "equivalence": equivalence}],
    }


CODES = code_map_from_json(
    concept_map(
        element("GLU", "2345-7"),
        element("GLUF", "2345-7", "wider"),
        element("LIPID", "57698-3", "narrower"),
        element("CHEM", "24323-8", "inexact"),
    )
)


def message(*obx: str) -> str:
    return "\r".join(
        [
            "MSH|^~\\&|LAB|ACME||TWIN|20240301093000+0100||ORU^R01^ORU_R01|MSG001|P|2.5.1",
            "PID|1||MRN123^^^ACME^MR||Doe^Jane||19800214|F",
            "OBR|1|PL1|FL1|24331-1^Lipid panel^LN|||20240301083000+0100",
            *obx,
        ]
    )


def observations(text: str, codes: CodeMap | None = CODES) -> list[dict[str, Any]]:
    resources = [orjson.loads(r) for r in message_resources(text, codes=codes)]
    return [r for r in resources if r["resourceType"] == "Observation"]


def test_a_mapped_local_code_gets_the_loinc_coding_first_and_keeps_its_own() -> None:
    (glucose,) = observations(message("OBX|1|NM|GLU^Glucose^L||99|mg/dL^mg/dL^UCUM|70-99||||F"))
    assert glucose["code"]["coding"] == [
        {"system": "http://loinc.org", "code": "2345-7", "display": "LOINC 2345-7"},
        {"system": LOCAL, "code": "GLU", "display": "Glucose"},
    ]
    assert "tag" not in glucose["meta"], "a mapped code is not flagged"


def test_only_equivalent_or_wider_targets_apply_and_unmapped_codes_are_kept_and_flagged() -> None:
    fasting, lipid, chem, other = observations(
        message(
            "OBX|1|NM|GLUF^Glucose fasting^L||99|mg/dL^mg/dL^UCUM||||||F",
            "OBX|2|ST|LIPID^Lipids^L||see report||||||F",
            "OBX|3|ST|CHEM^Chemistry^L||see report||||||F",
            "OBX|4|NM|NA^Sodium^L||140|mmol/L^mmol/L^UCUM||||||F",
        )
    )
    assert [c["code"] for c in fasting["code"]["coding"]] == ["2345-7", "GLUF"], "wider applies"
    for result, code in ((lipid, "LIPID"), (chem, "CHEM"), (other, "NA")):
        assert result["code"]["coding"] == [
            {"system": LOCAL, "code": code, "display": result["code"]["text"]}
        ], "narrower and inexact targets do not apply; the original coding stays"
        assert result["meta"]["tag"] == [UNMAPPED]
        Observation.model_validate(result)


def test_loinc_codes_are_kept_as_they_are_and_not_flagged() -> None:
    (hdl,) = observations(message("OBX|1|NM|2085-9^HDL^LN||1.20|mmol/L^mmol/L^UCUM|>1.0|N|||F"))
    assert hdl["code"]["coding"] == [{"system": "http://loinc.org", "code": "2085-9", "display": "HDL"}]
    assert "tag" not in hdl["meta"]


def test_without_a_concept_map_local_codes_are_flagged_and_counted() -> None:
    noted: Counter[str] = Counter()
    (result,) = [
        orjson.loads(r)
        for r in message_resources(message("OBX|1|NM|GLU^Glucose^L||99|mg/dL||||||F"), noted=noted)
        if b'"Observation"' in r
    ]
    assert result["meta"]["tag"] == [UNMAPPED]
    assert noted == {"codes unmapped": 1}


def test_a_group_without_source_matches_the_code_in_any_system_and_r5_maps_are_read() -> None:
    r5 = code_map_from_json(
        concept_map(
            {"code": "1001", "target": [{"code": "2345-7", "relationship": "equivalent"}]},
            {"code": "1002", "target": [{"code": "2093-3", "relationship": "source-is-broader-than-target"}]},
            source=None,
        )
    )
    assert r5.lookup("urn:acme:lab-codes", "1001") == ({"system": "http://loinc.org", "code": "2345-7"},)
    assert r5.lookup("urn:acme:lab-codes", "1002") == (), "a narrower target never applies"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "is not JSON"),
        (b'{"resourceType": "ValueSet"}', "is not a FHIR ConceptMap"),
        (
            concept_map({"code": "GLU", "target": [{"code": "2345-7"}]}),
            "is not a valid FHIR R4 ConceptMap: group.0.element.0.target.0.equivalence",
        ),
        (concept_map(element("GLU", "2345-8")), "maps 'GLU' to '2345-8', which is not a LOINC code"),
        (
            concept_map(element("GLU", "2345-7", "same")),
            "group 1 maps 'GLU' with equivalence 'same'; use one of: relatedto, equivalent, equal",
        ),
        (
            orjson.dumps({"resourceType": "ConceptMap", "status": "active", "group": [{"element": []}]}),
            "group 1 names no target system",
        ),
    ],
)
def test_a_bad_concept_map_says_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        code_map_from_json(data)


def test_the_shipped_example_concept_map_is_valid() -> None:
    example = Path(__file__).parents[3] / "examples" / "lab-codes-conceptmap.json"
    codes = code_map_from_json(example.read_bytes())
    assert codes.lookup(LOCAL, "GLU")[0]["code"] == "2345-7"
    assert codes.lookup(LOCAL, "LIPID") == (), "its narrower example is left unmapped"


@pytest.mark.parametrize(
    ("unit", "ucum"),
    [
        ("mg/dl", "mg/dL"),
        ("MG/DL", "mg/dL"),
        ("mmol/l", "mmol/L"),
        ("K/uL", "10*3/uL"),
        ("x10E3/uL", "10*3/uL"),
        ("10^3/uL", "10*3/uL"),
        ("IU/L", "[IU]/L"),
        ("mEq/L", "meq/L"),
        ("%", "%"),
        ("sec", "s"),
        ("pH", "[pH]"),  # not picohenry
        ("g/l-1", "g/L"),  # valid UCUM for g.L, sent meaning g.l-1
        ("G/l", "10*9/L"),  # giga per litre, while g/l is grams
        ("g/l", "g/L"),
        ("T/l", "10*12/L"),  # not tesla per litre
        ("AU/mL", "[arb'U]/mL"),  # not astronomical units
        ("mL/min/{1.73_m2}", "mL/min/{1.73_m2}"),  # valid UCUM is its own code
        ("10*6/uL", "10*6/uL"),
        ("furlongs/fortnight", None),
        ("per HPF", None),
        ("", None),
    ],
)
def test_unit_spellings_become_ucum(unit: str, ucum: str | None) -> None:
    assert ucum_code(unit) == ucum


SOURCE = LabCsvSource(
    name="lab",
    kind="lab-csv",
    path=Path("unused.csv"),
    columns=LabCsvColumns(
        id="id",
        patient="patient",
        code="code",
        code_system="system",
        time="time",
        value="value",
        unit="unit",
        reference_low="low",
        reference_high="high",
    ),
)
ROW = {
    "id": "r1",
    "patient": "p1",
    "code": "14749-6",
    "system": "http://loinc.org",
    "time": "2024-03-01T08:30:00Z",
    "value": "100",
    "unit": "mg/dl",
    "low": "70",
    "high": "99",
}


def row(**changes: str) -> dict[str, Any]:
    notes: list[str] = []
    resource: dict[str, Any] = orjson.loads(observation({**ROW, **changes}, SOURCE, CODES, notes))
    Observation.model_validate(resource)
    resource["notes"] = notes
    return resource


def test_glucose_in_mg_dl_under_a_moles_code_converts_to_mmol_l_with_its_range() -> None:
    glucose = row()
    assert glucose["valueQuantity"] == {
        "value": 5.55,
        "unit": "mmol/L",
        "system": "http://unitsofmeasure.org",
        "code": "mmol/L",
        "extension": [
            {
                "url": ORIGINAL_QUANTITY,
                "valueQuantity": {
                    "value": 100,
                    "unit": "mg/dl",
                    "system": "http://unitsofmeasure.org",
                    "code": "mg/dL",
                },
            }
        ],
    }
    low, high = glucose["referenceRange"][0]["low"], glucose["referenceRange"][0]["high"]
    assert (low["value"], low["code"], high["value"], high["code"]) == (3.89, "mmol/L", 5.50, "mmol/L")
    assert b'"high":{"value":5.50,' in observation(ROW, SOURCE), "99 / 18.016 = 5.495.. to 3 digits"
    assert high["extension"][0]["valueQuantity"]["value"] == 99
    assert glucose["notes"] == ["values converted"]


def test_conversion_keeps_the_precision_written_and_goes_both_ways() -> None:
    text = observation(
        {**ROW, "code": "2345-7", "value": "5.50", "unit": "mmol/L", "low": "", "high": ""}, SOURCE
    )
    assert b'"value":99.1,' in text, "3 significant digits, as written"
    precise = row(value="83.91762954741571", low="", high="")
    assert precise["valueQuantity"]["value"] == pytest.approx(83.91762954741571 / 18.016, rel=1e-9)
    creatinine = row(code="2160-0", value="88.4", unit="umol/L", low="", high="")
    assert (creatinine["valueQuantity"]["value"], creatinine["valueQuantity"]["code"]) == (1.0, "mg/dL")


def test_exponents_convert_and_values_beyond_a_decimal_stay_as_sent() -> None:
    assert row(value="1e2", low="", high="")["valueQuantity"]["value"] == 5.55
    huge = observation({**ROW, "value": "1e999999", "low": "", "high": ""}, SOURCE, CODES)
    assert b'"valueQuantity":{"value":1e999999,"unit":"mg/dl"' in huge and b"extension" not in huge


def test_units_already_in_the_target_or_of_unlisted_codes_are_not_converted() -> None:
    same = row(unit="mmol/L", value="5.50")
    assert (same["valueQuantity"]["value"], "extension" in same["valueQuantity"]) == (5.5, False)
    unlisted = row(code="718-7", unit="g/dl", value="13.9", low="", high="")
    assert unlisted["valueQuantity"] == {
        "value": 13.9,
        "unit": "g/dl",
        "system": "http://unitsofmeasure.org",
        "code": "g/dL",
    }, "the unit text stays as sent, the UCUM code beside it"
    assert unlisted["notes"] == []


def test_an_unknown_unit_is_kept_as_text_flagged_and_counted() -> None:
    result = row(code="718-7", unit="grams per decilitre", value="13.9", low="12", high="")
    assert result["valueQuantity"] == {"value": 13.9, "unit": "grams per decilitre"}
    assert result["referenceRange"][0]["low"] == {"value": 12, "unit": "grams per decilitre"}
    assert result["meta"]["tag"] == [UNKNOWN_UNIT]
    assert result["notes"] == ["units not UCUM"]


def test_a_local_code_in_a_csv_maps_and_the_batch_counts_what_happened() -> None:
    rows = [
        {**ROW, "id": "r1", "system": LOCAL, "code": "GLU", "unit": "mmol/L", "value": "5.50"},
        {**ROW, "id": "r2", "system": LOCAL, "code": "XYZ", "unit": "bogus units"},
        {**ROW, "id": "r3", "patient": ""},  # quarantined: counts nothing
    ]
    records = records_from([("labs.csv", n, orjson.dumps(r).decode()) for n, r in enumerate(rows, start=2)])
    batch = observations_from_rows(Batch(records=records, watermark={}), SOURCE, CODES)
    mapped, unmapped = (orjson.loads(r) for r in batch.records["raw"].to_pylist())
    assert [c["code"] for c in mapped["code"]["coding"]] == ["2345-7", "GLU"]
    assert mapped["valueQuantity"]["code"] == "mg/dL", "converted after mapping, to the LOINC's unit"
    assert unmapped["meta"]["tag"] == [UNMAPPED, UNKNOWN_UNIT]
    assert batch.stats == {"codes mapped": 1, "values converted": 1, "codes unmapped": 1, "units not UCUM": 1}
    assert len(batch.problems) == 1


def test_hl7_units_normalize_and_convert_like_csv_units() -> None:
    glucose, platelets, odd, local = observations(
        message(
            "OBX|1|NM|GLU^Glucose^L||5.5|mmol/l|3.9-5.5||||F",
            "OBX|2|NM|777-3^Platelets^LN||250|K/uL|150-400||||F",
            "OBX|3|NM|8867-4^Heart rate^LN||72|beats per minute^^ISO+|||||F",
            "OBX|4|NM|718-7^Hemoglobin^LN||13.9|g/dl^grams per deciliter^L|||||F",
        )
    )
    assert (glucose["valueQuantity"]["value"], glucose["valueQuantity"]["code"]) == (99.1, "mg/dL")
    assert glucose["referenceRange"][0]["text"] == "70.3-99.1 mg/dL", "the range text follows its bounds"
    assert glucose["valueQuantity"]["extension"][0]["valueQuantity"]["value"] == 5.5
    assert platelets["valueQuantity"] == {
        "value": 250,
        "unit": "K/uL",
        "system": "http://unitsofmeasure.org",
        "code": "10*3/uL",
    }
    assert platelets["referenceRange"][0]["text"] == "150-400", "an unconverted range keeps its text"
    assert odd["valueQuantity"] == {"value": 72, "unit": "beats per minute"}
    assert odd["meta"]["tag"] == [UNKNOWN_UNIT]
    assert local["valueQuantity"] == {
        "value": 13.9,
        "unit": "grams per deciliter",
        "system": "http://unitsofmeasure.org",
        "code": "g/dL",
    }, "OBX-6.1 in a local system is tried too; OBX-6.2 stays the text"


def test_normalizing_twice_changes_nothing() -> None:
    once = orjson.loads(observation({**ROW, "system": LOCAL, "code": "GLU"}, SOURCE, CODES))
    again = orjson.loads(orjson.dumps(once))
    normalize_observation(again, CODES)
    assert again == once


def test_every_unit_the_data_file_names_is_valid_ucum() -> None:
    from ucumvert import get_ucum_parser, parse_ucum

    from harmonize.labs.codes import conversions, spellings

    parser = get_ucum_parser()
    for unit in {*spellings()[0].values(), *(target for target, _ in conversions().values())}:
        parse_ucum(unit, parser)  # raises on a unit that is not UCUM


@pytest.mark.parametrize("unit", ["B", "Cel", "[degF]"])
def test_a_unit_that_cannot_convert_by_molar_mass_is_left_as_sent(unit: str) -> None:
    """Bel and offset units cannot be multiplied by a molar mass (pint raises); found by the
    mangled-input property test."""
    odd = row(unit=unit, value="5.5", low="", high="")
    assert (odd["valueQuantity"]["value"], odd["valueQuantity"]["code"]) == (5.5, unit)
    assert "extension" not in odd["valueQuantity"]
