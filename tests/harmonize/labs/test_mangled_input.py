"""Property tests: mangled HL7 v2 messages and lab CSV rows never crash the mapping; each is
either mapped whole (every resource valid, nothing of it left out) or refused with a reason that
names what is wrong, never half-mapped."""

from __future__ import annotations

import re
from collections import Counter

import orjson
import pyarrow as pa
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.observation import Observation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.base import RECORD_SCHEMA, Batch
from connectors.labs.hl7v2 import Hl7v2Source
from harmonize.labs.hl7v2 import resources_from_messages
from harmonize.labs.hl7v2_segments import segments
from harmonize.labs.rows import observations_from_rows
from tests.support.hl7v2 import NOISE, mangled_messages
from tests.support.labs import ROW, SOURCE

HL7_SOURCE = Hl7v2Source(name="lab", kind="hl7v2", path="unused")  # type: ignore[arg-type]
HL7_REFUSALS = [
    r"does not start with an MSH segment",
    r"MSH-1 and MSH-2 must be five distinct separators, not .*",
    r"cannot be parsed as HL7 v2 \(.+\)",
    r"is .+ \(MSH-9\); lab results come as ORU\^R01 or OUL\^R22-R24",
    r"has no PID segment: its results belong to no patient",
    r"PID-3 holds no patient identifier",
    r"time .+ is not an HL7 DTM \(YYYYMMDDHHMMSS\+ZZZZ\)",
    r"(OBR|OBX|SPM)-\d+ holds .+, which is not a LOINC code \(bad form or check digit\)",
    r"not a valid FHIR (Patient|DiagnosticReport|Observation|Specimen): \w+(\.\w+)*: .+",
]
"""Every reason `message_resources` gives for refusing a message (the module's own raises, and
a resource that fails its R4B model). Anything else, say an IndexError's "list index out of
range", is a crash the mapping swallowed, not a reason."""
DATETIME_BUG = r"Invalid isoformat string: .*|\w+ must be in \d+\.\.\d+.*|day is out of range for month"
"""KNOWN BUG, allowed here so that the property keeps guarding the rest (strict xfails in
test_hl7v2.py pin it): `fhir_datetime` lets Python's datetime refuse a DTM without an offset that
is no real time, and its message, naming neither the field nor the value, becomes the reason."""


def records(texts: list[str]) -> Batch:
    n = len(texts)
    table = pa.table(
        [pa.array(["f"] * n), pa.array(range(1, n + 1), pa.int64()), pa.array(texts), pa.repeat(False, n)],
        schema=RECORD_SCHEMA,
    )
    return Batch(records=table, watermark={})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mangled_messages(), min_size=1, max_size=4))
def test_mangled_hl7_messages_map_whole_or_are_refused_with_a_reason(messages: list[str]) -> None:
    out = resources_from_messages(records(messages), HL7_SOURCE)
    landed: dict[int, list[dict[str, object]]] = {}
    for number, text in zip(out.records["line_no"].to_pylist(), out.records["raw"].to_pylist(), strict=True):
        landed.setdefault(number, []).append(orjson.loads(text))
    refused = dict(zip(out.problems["line_no"].to_pylist(), out.problems["reason"].to_pylist(), strict=True))
    assert landed.keys().isdisjoint(refused) and {*landed, *refused} == set(range(1, len(messages) + 1))
    for number, reason in refused.items():
        prefix = f"message {number}: "
        assert reason.startswith(prefix), reason
        assert any(
            re.fullmatch(known, reason.removeprefix(prefix), re.S) for known in [*HL7_REFUSALS, DATETIME_BUG]
        ), reason
    for number, resources in landed.items():
        for resource in resources:
            get_fhir_model_class(str(resource["resourceType"])).model_validate(resource)
        # Whole: the patient, and one resource for each order, specimen and result segment.
        names = Counter(segment.name for segment in segments(messages[number - 1]))
        made = Counter(str(r["resourceType"]) for r in resources)
        assert made == Counter(
            Patient=1, DiagnosticReport=names["OBR"], Specimen=names["SPM"], Observation=names["OBX"]
        ), messages[number - 1]


FIELDS_FROM = {
    "subject": {"mrn"},
    "code": {"test", "name"},
    "effectiveDateTime": {"taken"},
    "identifier": {"result_id"},
    "valueQuantity": {"result", "units", "ucum"},
    "valueString": {"result"},
    "valueCodeableConcept": {"coded", "coded_system"},
    "referenceRange": {"low", "high", "units", "ucum"},
    "interpretation": {"flag"},
}
"""Which columns of `tests.support.labs.SOURCE` each Observation field is made from."""
NEEDED = {"mrn": "patient", "test": "code", "taken": "time"}
"""The columns a row cannot map without, in the order the mapping checks them."""


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(ROW)), NOISE, max_size=len(ROW)))
def test_mangled_lab_rows_map_to_a_valid_observation_or_are_refused_naming_the_problem(
    changes: dict[str, str],
) -> None:
    row = {**ROW, **changes}
    out = observations_from_rows(records([orjson.dumps(row).decode()]), SOURCE)
    assert out.records.num_rows + out.problems.num_rows == 1, "one row: mapped or refused"
    if out.records.num_rows:
        resource = orjson.loads(out.records["raw"][0].as_py())
        Observation.model_validate(resource)
        assert resource["subject"] == {"reference": f"Patient/{row['mrn'].strip()}"}
        assert resource["code"]["coding"][0]["code"] == row["test"].strip()
        assert resource["effectiveDateTime"] == row["taken"].strip()
        return
    reason = out.problems["reason"][0].as_py()
    empty = [column for column in NEEDED if not row[column].strip()]
    if empty:  # the first column the mapping needs, empty, is the reason
        assert reason == f"no {NEEDED[empty[0]]} (column {empty[0]!r} is empty)"
    elif reason.endswith(" is not a number"):  # a reference range bound
        assert reason in {f"{row[c].strip()!r} is not a number" for c in ("low", "high")}, reason
    else:
        found = re.fullmatch(r"not a valid FHIR Observation: (\w+)[.\w]*: .+", reason, re.S)
        assert found and found[1] in FIELDS_FROM, reason
        assert FIELDS_FROM[found[1]] & changes.keys(), f"{reason} names a field no changed column makes"
