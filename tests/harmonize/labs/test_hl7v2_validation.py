"""Every HL7 v2 resource is validated with its R4B model; the same text only once."""

from __future__ import annotations

import pytest

from harmonize.labs.hl7v2 import message_resources, validate
from tests.support.hl7v2 import MESSAGE


def test_a_resource_sent_again_is_validated_once_and_a_bad_one_fails_every_time() -> None:
    patient = message_resources(MESSAGE)[0]
    hits = validate.cache_info().hits
    assert message_resources(MESSAGE.replace("MSG001", "MSG002"))[0] == patient
    assert validate.cache_info().hits > hits, "the same Patient was not validated again"
    bad = patient.replace(b'"birthDate":"1980-02-14"', b'"birthDate":"14.02.1980"')
    assert bad != patient
    for _ in range(2):
        with pytest.raises(ValueError, match="birthDate"):
            validate("Patient", bad)
