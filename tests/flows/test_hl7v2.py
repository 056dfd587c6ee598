"""HL7 v2 lab messages from the shared samples, through the real pipeline into a real store, and
checked against Microsoft FHIR-Converter's own expected output."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors.labs.hl7v2 import Hl7v2Connector, Hl7v2Source, split_messages
from flows.sync import harmonized, land_batches
from harmonize.labs.hl7v2 import message_resources
from tests.support.data import SHARED
from twin_store import TwinStore, connect

HL7 = SHARED / "labs" / "hl7v2"
CONVERTER = HL7 / "microsoft-fhir-converter"
pytestmark = pytest.mark.skipif(not HL7.is_dir(), reason=f"shared HL7 v2 samples not found at {HL7}")

# Where we differ from the Converter on purpose (the rest must match):
# - status: OBX-11 I (in lab) and S (partial) map to `registered` and `preliminary`, as the HL7
#   v2-to-FHIR guide says; the Converter gives `unknown`.
# - effective time: the Converter rewrites times into the zone of the machine it ran on; we keep
#   the message's own offset. The instants are compared.
# - we map every OBX: the Converter leaves out RP/ED results and some OUL ones, and sometimes
#   drops a reference range or unit the message sends. Its Observations must all be among ours.
# - units (harmonize.labs.codes): `unit` keeps the text the message sends, as the Converter's does;
#   we add the UCUM system and code where the unit is UCUM or a known spelling (beats/min -> /min,
#   giga.l-1 -> 10*9/L, g/l-1 -> g/L). None of the 11 messages sends a result that lab_units.toml
#   converts, so no value or unit differs here; local OBX-3 codes (3DHISTECH_*^L) are also tagged
#   unmapped-code.
DELIBERATE_STATUS = {("unknown", "registered"), ("unknown", "preliminary")}


def test_every_shared_message_lands_or_is_quarantined_with_a_reason(tmp_path: Path) -> None:
    source = Hl7v2Source(name="labs", kind="hl7v2", path=HL7)
    with TwinStore(tmp_path / "store") as store:
        run = store.begin_run("labs", "sync")
        land_batches(store, run, harmonized(source, Hl7v2Connector(source).pull(None)))
        store.finish_run(run, "succeeded")
    con = connect(tmp_path / "store")
    mapped: dict[str, set[str]] = {}
    good = 0
    for file in Hl7v2Connector(source).files():
        for message in split_messages(file):
            try:
                for resource in map(orjson.loads, message_resources(message)):
                    mapped.setdefault(resource["resourceType"], set()).add(resource["id"])
                good += 1
            except ValueError:
                pass  # the store's quarantine must hold it, checked below
    quarantined = con.sql("SELECT file, reason FROM quarantine ORDER BY file").fetchall()
    bad_loinc = "message 1: OBX-3 holds {!r}, which is not a LOINC code (bad form or check digit)"
    assert [(Path(f).name, r) for f, r in quarantined] == [
        ("ORU_R01_2.5.1_SampleTestCase6.hl7", bad_loinc.format("20995-1")),
        ("realm-cj-badloinc.hl7", bad_loinc.format("xx625-4")),
    ]
    assert good + len(quarantined) == 28, "every message lands or is quarantined"
    stored: dict[str, set[str]] = {}
    for resource_type, id_ in con.sql("SELECT resource_type, id FROM fhir_resource").fetchall():
        stored.setdefault(resource_type, set()).add(id_)
    assert stored == mapped, "everything the 26 good messages map to landed (resends update, by id)"
    assert con.sql("SELECT count(*) FROM lab_result").fetchone() == (len(mapped["Observation"]),)
    orphans = con.sql(
        "SELECT count(*) FROM lab_result l LEFT JOIN patient p ON p.id = l.patient_id WHERE p.id IS NULL"
    ).fetchone()
    assert orphans == (0,), "every result belongs to the patient its message names"


def facts(observation: dict[str, Any]) -> dict[str, Any]:
    coding = (observation.get("code", {}).get("coding") or [{}])[0]
    quantity = observation.get("valueQuantity") or {}
    concept = (observation.get("valueCodeableConcept") or {}).get("coding") or [{}]
    return {
        "code": coding.get("code"),
        "loinc": coding.get("system") == "http://loinc.org",
        "value": quantity.get("value", concept[0].get("code", observation.get("valueString"))),
        "unit": quantity.get("unit"),
        "interpretation": [c["coding"][0]["code"] for c in observation.get("interpretation", [])],
        "range": (observation.get("referenceRange") or [{}])[0].get("text"),
    }


def instant(text: str | None) -> object:
    return datetime.fromisoformat(text) if text and "T" in text else text


@pytest.mark.parametrize("message", sorted(CONVERTER.glob("messages/*.hl7")), ids=lambda p: p.stem)
def test_observations_match_the_converters_expected_output(message: Path) -> None:
    bundle = orjson.loads((CONVERTER / "expected-fhir" / f"{message.stem}-expected.json").read_bytes())
    expected = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    ours = [orjson.loads(r) for r in message_resources(split_messages(message)[0])]
    ours = [r for r in ours if r["resourceType"] == "Observation"]
    unmatched = list(ours)
    for theirs in expected:
        want = facts(theirs)
        candidates = [
            o for o in unmatched if facts(o)["code"] == want["code"] and facts(o)["value"] == want["value"]
        ]
        assert candidates, f"no Observation of ours has code {want['code']} and value {want['value']}"
        mine = candidates[0]
        unmatched.remove(mine)
        got = facts(mine)
        assert (got["loinc"], got["interpretation"]) == (want["loinc"], want["interpretation"]), want["code"]
        for key in ("unit", "range"):  # where the Converter keeps one, it is ours too
            assert want[key] is None or got[key] == want[key], (want["code"], key)
        status = (theirs["status"], mine["status"])
        assert status[0] == status[1] or status in DELIBERATE_STATUS, status
        when = theirs.get("effectiveDateTime")
        assert when is None or instant(mine.get("effectiveDateTime")) == instant(when), want["code"]


def test_no_two_different_resources_of_a_message_share_an_id() -> None:
    """A shared id keeps only the last copy: NIST's realm-cj-joeslab sends two tests under one
    filler order number, and two specimens of different kinds under one placer id."""
    checked = 0
    for path in sorted(HL7.rglob("*.hl7")):
        for message in split_messages(path):
            try:
                resources = message_resources(message)
            except ValueError:
                continue
            by_id: dict[str, set[bytes]] = {}
            for resource in resources:
                by_id.setdefault(orjson.loads(resource)["id"], set()).add(resource)
            assert all(len(copies) == 1 for copies in by_id.values()), path.name
            checked += 1
    assert checked == 26
