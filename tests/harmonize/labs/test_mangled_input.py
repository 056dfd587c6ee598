"""Property tests: mangled HL7 v2 messages and lab CSV rows never crash the mapping; each is
either mapped whole (every resource valid) or refused with a reason, never half-mapped."""

from __future__ import annotations

import orjson
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.base import RECORD_SCHEMA, Batch
from connectors.labs.hl7v2 import Hl7v2Source
from harmonize.labs.hl7v2 import resources_from_messages
from harmonize.labs.rows import observation
from tests.support.hl7v2 import NOISE, mangled_messages
from tests.support.labs import ROW, SOURCE

HL7_SOURCE = Hl7v2Source(name="lab", kind="hl7v2", path="unused")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mangled_messages(), min_size=1, max_size=4))
def test_mangled_hl7_messages_map_whole_or_are_refused_with_a_reason(messages: list[str]) -> None:
    records = pa.table(
        [pa.array(["f"] * len(messages)), pa.array(range(1, len(messages) + 1), pa.int64()),
         pa.array(messages), pa.repeat(False, len(messages))],
        schema=RECORD_SCHEMA,
    )  # fmt: skip
    out = resources_from_messages(Batch(records=records, watermark={}), HL7_SOURCE)
    landed = set(out.records["line_no"].to_pylist())
    refused = out.problems["line_no"].to_pylist()
    assert landed.isdisjoint(refused) and landed | set(refused) == set(range(1, len(messages) + 1))
    assert all(reason for reason in out.problems["reason"].to_pylist())
    for text in out.records["raw"].to_pylist():
        assert orjson.loads(text)["resourceType"] in {
            "Patient",
            "DiagnosticReport",
            "Observation",
            "Specimen",
        }


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(ROW)), NOISE, max_size=len(ROW)))
def test_mangled_lab_rows_map_to_a_valid_observation_or_fail_with_a_reason(changes: dict[str, str]) -> None:
    from fhir.resources.R4B.observation import Observation

    try:
        Observation.model_validate_json(observation({**ROW, **changes}, SOURCE))
    except ValueError as e:
        assert str(e)
