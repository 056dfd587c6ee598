"""The lazy segment reader against python-hl7, the reference: on every shared message and on
mangled ones, every value the mapping can ask for (field, component, repeat; repeat counts; raw
fields; segment names) must read the same, and a message python-hl7 cannot parse is refused."""

from __future__ import annotations

from typing import Any

import hl7
import pytest
from hypothesis import HealthCheck, given, settings

from connectors.labs.hl7v2 import Hl7v2Connector, Hl7v2Source, split_messages
from harmonize.labs.hl7v2_segments import Segment, segments
from tests.support.data import SHARED
from tests.support.hl7v2 import MESSAGE, mangled_messages

HL7 = SHARED / "labs" / "hl7v2"


def reference_get(segment: Any, field: int, component: int, repeat: int) -> str:
    """How the mapping read python-hl7's containers before the lazy reader."""
    try:
        value = segment(field)
    except IndexError:
        return ""
    try:
        return str(value(repeat)(component)).strip()
    except (IndexError, TypeError, AttributeError):
        return str(value).strip() if component == 1 and repeat == 1 else ""


def reference_repeats(segment: Any, field: int) -> int:
    if len(segment) > field and isinstance(segment[field], hl7.containers.Field):
        return len(segment[field])
    return 1


def assert_reads_alike(text: str) -> int:
    """Compares every value of `text`; returns how many were compared."""
    reference = hl7.parse(text)
    ours = segments(text)
    assert [s.name for s in ours] == [str(s[0]) for s in reference]
    compared = 0
    for mine, theirs in zip(ours, reference, strict=True):
        assert isinstance(mine, Segment) and len(mine) == len(theirs)
        for field in range(len(theirs) + 2):
            assert mine.repeats(field) == reference_repeats(theirs, field), (mine.name, field)
            if field < len(theirs):
                assert mine.raw(field) == str(theirs[field]), (mine.name, field)
            pieces = str(theirs[field]).count("^") + 2 if field < len(theirs) else 2
            for repeat in range(1, mine.repeats(field) + 2):
                for component in range(1, pieces + 1):
                    want = reference_get(theirs, field, component, repeat)
                    assert mine.get(field, component, repeat) == want, (mine.name, field, component, repeat)
                    compared += 1
    return compared


def shared_messages() -> list[str]:
    if not HL7.is_dir():
        return []
    source = Hl7v2Source(name="labs", kind="hl7v2", path=HL7)
    return [m for f in Hl7v2Connector(source).files() for m in split_messages(f)]


@pytest.mark.skipif(not HL7.is_dir(), reason=f"shared HL7 v2 samples not found at {HL7}")
def test_every_shared_message_reads_as_python_hl7_reads_it() -> None:
    messages = shared_messages()
    assert len(messages) == 28
    assert sum(assert_reads_alike(m) for m in messages) > 10_000


def test_headers_separators_and_sub_components_read_as_python_hl7_reads_them() -> None:
    pid = "MRN123^^^ACME&1.2.3&ISO^MR~X9^^^B^PI"
    text = MESSAGE.replace("MRN123^^^ACME^MR", pid) + "\rBHS|^~\\&|A\rZZZ\r"
    assert assert_reads_alike(text) > 100
    pid = segments(text)[1]
    assert (pid.get(3, 4), pid.get(3, 1, 2), pid.repeats(3)) == ("ACME&1.2.3&ISO", "X9", 2)
    assert (segments(text)[0].get(2), segments(text)[0].get(9, 2)) == ("^~\\&", "R01")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mangled_messages())
def test_mangled_messages_read_as_python_hl7_reads_them_or_are_refused_alike(text: str) -> None:
    separators = text[3:8]
    if len(set(separators)) != 5 or any(c.isalnum() or c in "\r\n " for c in separators):
        return  # the mapping refuses these before reading (test_hl7v2_labs checks the reasons)
    try:
        hl7.parse(text)
    except Exception:
        with pytest.raises(ValueError):
            segments(text)
        return
    assert_reads_alike(text)
