"""Every OBX is an Observation of its own, text results are kept whole, and what a message maps to
carries the message's time (MSH-7) for the store's newest-wins rule."""

from __future__ import annotations

from collections import Counter

import orjson

from harmonize.labs.hl7v2 import message_resources
from tests.support.hl7v2 import MESSAGE

HEAD = MESSAGE.split("\rOBX")[0]  # MSH, PID, OBR, SPM


def resources(text: str) -> list[dict[str, object]]:
    return [orjson.loads(r) for r in message_resources(text)]


def observations(text: str) -> list[dict[str, object]]:
    return [r for r in resources(text) if r["resourceType"] == "Observation"]


def test_ten_thousand_results_of_one_code_without_sub_id_are_ten_thousand_observations() -> None:
    obx = [f"OBX|{n}|NM|8867-4^Heart rate^LN||{60 + n % 40}|/min^/min^UCUM|||||F" for n in range(1, 10_001)]
    mapped = resources("\r".join([HEAD, *obx]))
    results = [r for r in mapped if r["resourceType"] == "Observation"]
    (report,) = [r for r in mapped if r["resourceType"] == "DiagnosticReport"]
    assert len({r["id"] for r in results}) == 10_000
    assert [r["valueQuantity"]["value"] for r in results] == [60 + n % 40 for n in range(1, 10_001)]  # type: ignore[index]
    assert report["result"] == [{"reference": f"Observation/{r['id']}"} for r in results]


def test_a_text_report_keeps_every_line() -> None:
    lines = ["FINDINGS:", "Lungs are clear.", "No effusion.", "", "IMPRESSION: normal."]
    one_obx = f"OBX|1|TX|11526-1^Pathology study^LN||{'~'.join(lines)}||||||F"
    (report,) = observations(f"{HEAD}\r{one_obx}")
    assert report["valueString"] == "\n".join(lines), "a repeated OBX-5 is a line per repeat"

    obx_per_line = [
        f"OBX|{n}|TX|11526-1^Pathology study^LN||{line}||||||F" for n, line in enumerate(lines, 1)
    ]
    results = observations("\r".join([HEAD, *obx_per_line]))
    assert [r.get("valueString") for r in results] == [line or None for line in lines]
    assert len({r["id"] for r in results}) == 5


def test_the_first_result_of_a_code_keeps_its_id_so_a_corrected_resend_updates_it() -> None:
    twice = f"{MESSAGE}\rOBX|4|NM|14647-2^Cholesterol^LN||5.60|mmol/L^mmol/L^UCUM|3.0-5.2|H|||F"
    before, after = observations(MESSAGE), observations(twice)
    assert [r["id"] for r in after[:3]] == [r["id"] for r in before]
    assert after[3]["id"] not in {r["id"] for r in before}
    assert Counter(r["id"] for r in after).most_common(1)[0][1] == 1


def test_reports_results_and_specimens_carry_the_message_time_and_the_patient_does_not() -> None:
    mapped = resources(MESSAGE)
    stamped = {r["resourceType"]: r.get("meta", {}).get("lastUpdated") for r in mapped}  # type: ignore[attr-defined]
    assert stamped == {
        "Patient": None,
        "DiagnosticReport": "2024-03-01T09:30:00+01:00",
        "Specimen": "2024-03-01T09:30:00+01:00",
        "Observation": "2024-03-01T09:30:00+01:00",
    }
    coarse = resources(MESSAGE.replace("20240301093000+0100", "20240301"))
    assert all("lastUpdated" not in r.get("meta", {}) for r in coarse), "a date alone is no instant"  # type: ignore[attr-defined]
