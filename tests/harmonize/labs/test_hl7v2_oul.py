"""OUL^R22-R24 structures: which Specimen (SPM, with its SAC containers) each DiagnosticReport
(OBR) and Observation (OBX) belongs to. R22 and R23 are specimen-centric (an SPM heads the
orders after it; R23 with containers between), R24 is order-centric (an OBR's SPMs follow it)."""

from __future__ import annotations

from typing import Any

import orjson

from harmonize.labs.hl7v2 import message_resources

MSH = "MSH|^~\\&|LIS|LAB||TWIN|20240301093000+0100||{}|C1|P|2.5.1"
PID = "PID|1||MRN9^^^ACME^MR||Roe^Ann||19700101|F"


def sac(container: str, capacity: str = "", volume: str = "") -> str:
    """SAC-3 container id, SAC-21 capacity, SAC-22 specimen volume, SAC-24 units."""
    fields = ["SAC", "", "ACC-1", container] + [""] * 17 + [capacity, volume, "", "mL^milliliter^UCUM"]
    return "|".join(fields)


def obr(n: int, code: str = "24331-1^Lipid panel^LN") -> str:
    return f"OBR|{n}|P{n}|F{n}|{code}|||20240301083000+0100"


CHOLESTEROL = "OBX|1|NM|2093-3^Cholesterol^LN||5.5|mmol/L^mmol/L^UCUM|3.0-5.2|H|||F"
GLUCOSE = "OBX|1|NM|2345-7^Glucose^LN||5.1|mmol/L^mmol/L^UCUM|||||F"
SPECIMEN_NOTE = "OBX|1|ST|8251-1^Comment^LN||{}||||||F"


def resources(kind: str, *segments: str) -> dict[str, list[dict[str, Any]]]:
    text = "\r".join([MSH.format(kind), PID, *segments])
    by_type: dict[str, list[dict[str, Any]]] = {}
    for resource in map(orjson.loads, message_resources(text)):
        by_type.setdefault(resource["resourceType"], []).append(resource)
    return by_type


def ref(resource: dict[str, Any]) -> dict[str, str]:
    return {"reference": f"{resource['resourceType']}/{resource['id']}"}


def test_r22_each_specimen_heads_its_orders_and_its_own_results() -> None:
    got = resources(
        "OUL^R22^OUL_R22",
        "SPM|1|SPA&LIS^SPA-F&LAB||BLD^Whole blood^HL70487|||||||||||||20240301080000+0100",
        SPECIMEN_NOTE.format("lipaemic"),
        sac("CONT-A1", "5", "3"),
        obr(1),
        CHOLESTEROL,
        "SPM|2|SPB&LIS||SER^Serum^HL70487",
        SPECIMEN_NOTE.format("clotted"),
        obr(2, "2345-7^Glucose^LN"),
        GLUCOSE,
    )
    (a, b), (report_a, report_b) = got["Specimen"], got["DiagnosticReport"]
    note_a, cholesterol, note_b, glucose = got["Observation"]
    assert (a["identifier"], a["accessionIdentifier"]) == ([{"value": "SPA"}], {"value": "SPA-F"})
    assert a["collection"] == {"collectedDateTime": "2024-03-01T08:00:00+01:00"}
    unit = {"unit": "milliliter", "system": "http://unitsofmeasure.org", "code": "mL"}
    assert a["container"] == [
        {
            "identifier": [{"value": "CONT-A1"}],
            "capacity": {"value": 5, **unit},
            "specimenQuantity": {"value": 3, **unit},
        },
    ]
    assert (report_a["specimen"], report_a["result"]) == ([ref(a)], [ref(cholesterol)])
    assert (report_b["specimen"], report_b["result"]) == ([ref(b)], [ref(glucose)])
    assert [o["specimen"] for o in (note_a, cholesterol, note_b, glucose)] == [ref(a), ref(a), ref(b), ref(b)]
    assert note_a["id"] != note_b["id"], "results outside an order are told apart by their specimen"
    assert "container" not in b


def test_r23_orders_under_each_container_share_the_specimen() -> None:
    got = resources(
        "OUL^R23^OUL_R23",
        "SPM|1|SPA||SER^Serum^HL70487",
        sac("TUBE-1"),
        obr(1),
        CHOLESTEROL,
        sac("TUBE-2", volume="1.5"),
        obr(2, "2345-7^Glucose^LN"),
        GLUCOSE,
    )
    (specimen,) = got["Specimen"]
    assert specimen["container"] == [
        {"identifier": [{"value": "TUBE-1"}]},
        {
            "identifier": [{"value": "TUBE-2"}],
            "specimenQuantity": {
                "value": 1.5,
                "unit": "milliliter",
                "system": "http://unitsofmeasure.org",
                "code": "mL",
            },
        },
    ]
    assert [r["specimen"] for r in got["DiagnosticReport"]] == [[ref(specimen)], [ref(specimen)]]
    assert [r["result"] for r in got["DiagnosticReport"]] == [[ref(o)] for o in got["Observation"]]
    assert [o["specimen"] for o in got["Observation"]] == [ref(specimen), ref(specimen)]


def test_r24_each_order_has_the_specimens_that_follow_it() -> None:
    got = resources(
        "OUL^R24^OUL_R24",
        obr(1),
        "SPM|1|SPA||SER^Serum^HL70487",
        sac("TUBE-1"),
        CHOLESTEROL,
        obr(2, "2345-7^Glucose^LN"),
        "SPM|1|SPB||PLAS^Plasma^HL70487",
        GLUCOSE,
    )
    (a, b), (report_a, report_b) = got["Specimen"], got["DiagnosticReport"]
    cholesterol, glucose = got["Observation"]
    assert a["container"] == [{"identifier": [{"value": "TUBE-1"}]}] and "container" not in b
    assert (report_a["specimen"], report_a["result"]) == ([ref(a)], [ref(cholesterol)])
    assert (report_b["specimen"], report_b["result"]) == ([ref(b)], [ref(glucose)])
    assert (cholesterol["specimen"], glucose["specimen"]) == (ref(a), ref(b))


def test_an_oru_order_keeps_only_its_own_specimens() -> None:
    got = resources(
        "ORU^R01^ORU_R01",
        obr(1),
        CHOLESTEROL,
        "SPM|1|SPA||SER^Serum^HL70487",
        obr(2, "2345-7^Glucose^LN"),
        GLUCOSE,
    )
    report_a, report_b = got["DiagnosticReport"]
    assert report_a["specimen"] == [ref(got["Specimen"][0])] and "specimen" not in report_b
    assert "specimen" not in got["Observation"][1], "no SPM follows the second order"
