"""HL7 v2 lab results (ORU^R01, OUL^R22-R24; v2.3-2.8) as FHIR R4: Patient, DiagnosticReport,
Observation and Specimen, after the HL7 v2-to-FHIR mapping guide (segments PID, OBR, OBX, SPM).

Reports, results and specimens carry the message's time (MSH-7) as `meta.lastUpdated`: the
store keeps the newest copy of a resource by it, so an older message that arrives late (a
preliminary result after its final one, from a file or over MLLP) never undoes a newer one.

A message maps whole or not at all: any resource that fails the fhir.resources R4B model, or a
LOINC code that fails its check digit, sends the message to quarantine with the reason. Ids
derive from what identifies each thing across messages (the patient's identifier, the order's
filler number, the result's code and sub-id), so a corrected result updates the one it corrects.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import lru_cache, partial
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.specimen import Specimen
from pydantic import BaseModel

from connectors.base import Batch
from connectors.labs.hl7v2 import Hl7v2Source
from harmonize.labs.codes import CodeMap, loinc_is_valid, normalize_observation
from harmonize.labs.hl7v2_segments import Segment, segments
from harmonize.records import map_records, patient_reference

MODELS: dict[str, type[BaseModel]] = {
    "Patient": Patient,
    "DiagnosticReport": DiagnosticReport,
    "Observation": Observation,
    "Specimen": Specimen,
}
TERMINOLOGY = "http://terminology.hl7.org/CodeSystem"
CODE_SYSTEMS = {
    "LN": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "SNM": "http://snomed.info/sct",
    "UCUM": "http://unitsofmeasure.org",
    "HL70078": f"{TERMINOLOGY}/v2-0078",
}
RESULT_STATUS = {
    "F": "final",
    "C": "corrected",
    "P": "preliminary",
    "R": "preliminary",
    "S": "preliminary",
    "A": "amended",
    "X": "cancelled",
    "I": "registered",
    "D": "entered-in-error",
    "W": "entered-in-error",
}
"""OBX-11 -> Observation.status, as the v2-to-FHIR guide maps it."""
REPORT_STATUS = {"F": "final", "C": "corrected", "P": "preliminary", "A": "partial", "X": "cancelled"}
INTERPRETATION = f"{TERMINOLOGY}/v3-ObservationInterpretation"
INTERPRETATIONS = {
    "N": "Normal",
    "A": "Abnormal",
    "AA": "Critical abnormal",
    "H": "High",
    "HH": "Critical high",
    "L": "Low",
    "LL": "Critical low",
    "<": "Off scale low",
    ">": "Off scale high",
    "S": "Susceptible",
    "R": "Resistant",
    "I": "Intermediate",
    "POS": "Positive",
    "NEG": "Negative",
}
TEXT = ("TX", "FT", "ST")
"""Text results: a repeated OBX-5 of these is one text, a line per repeat."""
LAB = {"coding": [{"system": f"{TERMINOLOGY}/observation-category", "code": "laboratory"}]}
NUMBER = re.compile(r"[+-]?(0|[1-9][0-9]*)(\.[0-9]+)?")
DECIMAL = r"[+-]?\d+(?:\.\d+)?"
RANGE = re.compile(
    rf"\s*(?:(?P<low>{DECIMAL})\s*-\s*(?P<high>{DECIMAL})|<=?\s*(?P<below>{DECIMAL})|>=?\s*(?P<above>{DECIMAL}))\s*"
)
DTM = re.compile(r"(\d{4})(\d{2})?(\d{2})?(?:(\d{2})(\d{2})(\d{2})?(\.\d+)?)?([+-]\d{4})?")
LOCAL_SYSTEM = "urn:twinhub:hl7v2:"
"""Identifier system of a PID-3 assigning authority the source's `patient_systems` does not name."""
IDS = uuid.UUID("5b0d7c7e-2f4c-4d8e-9c62-6a3c0a1f9e21")


def resources_from_messages(batch: Batch, source: Hl7v2Source, codes: CodeMap | None = None) -> Batch:
    """The batch's messages as FHIR records (several per message), bad messages as problems;
    Observations' codes and units normalized (`harmonize.labs.codes`), `codes` the local code map."""
    return map_records(
        batch,
        partial(
            message_resources,
            timezone=source.timezone,
            codes=codes,
            patient_systems=source.patient_systems,
            create_patients=source.create_patients,
        ),
        "message",
    )


def message_resources(
    text: str,
    timezone: str = "UTC",
    codes: CodeMap | None = None,
    noted: Counter[str] | None = None,
    *,
    patient_systems: Mapping[str, str] | None = None,
    create_patients: bool = True,
) -> list[bytes]:
    """Every resource of one lab message, validated; raises ValueError saying what is wrong.
    What normalizing its Observations did is counted in `noted` once the message maps.

    PID-3 identifiers take the system their assigning authority stands for in
    `patient_systems`. Without `create_patients` no Patient is made from PID: the results
    name their patient by identifier, and the store links them to the twin's Patient."""
    if not text.startswith("MSH"):
        raise ValueError("does not start with an MSH segment")
    separators = text[3:8]
    if len(set(separators)) != 5 or any(c.isalnum() or c in "\r\n " for c in separators):
        raise ValueError(f"MSH-1 and MSH-2 must be five distinct separators, not {separators!r}")
    try:
        message = segments(text)
    except ValueError as e:
        raise ValueError(f"cannot be parsed as HL7 v2 ({e})") from None
    msh = message[0]
    kind = "^".join(part for part in (_get(msh, 9, 1), _get(msh, 9, 2)) if part)
    if kind not in ("ORU^R01", "OUL^R22", "OUL^R23", "OUL^R24"):
        raise ValueError(f"is {kind or 'of no type'} (MSH-9); lab results come as ORU^R01 or OUL^R22-R24")
    when: Callable[[str], str | None] = lambda value: fhir_datetime(value, timezone)  # noqa: E731
    pid = _first(message, "PID")
    if pid is None:
        raise ValueError("has no PID segment: its results belong to no patient")
    patient = _patient(pid, patient_systems or {})
    if create_patients:
        subject: dict[str, Any] = {"reference": f"Patient/{patient['id']}"}
        resources = [patient]
    else:  # by the identifier of an authority the config names, else the first
        known = [i for i in patient["identifier"] if not i["system"].startswith(LOCAL_SYSTEM)]
        first = (known or patient["identifier"])[0]
        subject, resources = patient_reference(first["value"], first["system"]), []
    control_id = _get(msh, 10)
    # ORU^R01 and OUL^R24 are order-centric: an OBR's specimens (SPM) follow it. OUL^R22 and
    # R23 are specimen-centric: each SPM (with its containers, SAC) heads the orders that follow.
    specimen_centric = kind in ("OUL^R22", "OUL^R23")
    order: dict[str, Any] | None = None
    specimen: dict[str, Any] | None = None
    specimen_ids: list[dict[str, str]] = []
    seen: Counter[tuple[str, ...]] = Counter()  # results of one code and sub-id in one scope so far
    for n, segment in enumerate(message, start=1):
        name = segment.name
        if name == "OBR":
            order = _report(segment, subject, control_id, n, when)
            if specimen_centric and specimen_ids:
                order["specimen"] = [specimen_ids[-1]]
            elif not specimen_centric:
                specimen, specimen_ids = None, []
            resources.append(order)
        elif name == "SPM":
            specimen = _specimen(segment, subject, control_id, n, when)
            specimen_ids.append({"reference": f"Specimen/{specimen['id']}"})
            resources.append(specimen)
            if specimen_centric:
                order = None  # OBX before the group's first OBR are about the specimen itself
            elif order is not None:
                order["specimen"] = [*order.get("specimen", []), specimen_ids[-1]]
        elif name == "SAC" and specimen is not None:
            if container := _container(segment):
                specimen["container"] = [*specimen.get("container", []), container]
        elif name == "OBX":
            # outside an order, a result is told apart by its specimen (OUL specimen results)
            scope = control_id if specimen is None else f"{control_id}|{specimen['id']}"
            key = _result_key(segment, order["id"] if order else scope, numbered=order is None)
            seen[key] += 1
            result = _observation(segment, subject, key, seen[key], when)
            if order is not None:
                order["result"] = [*order.get("result", []), {"reference": f"Observation/{result['id']}"}]
                result.setdefault("effectiveDateTime", order.get("effectiveDateTime"))
                if result["effectiveDateTime"] is None:
                    del result["effectiveDateTime"]
            if specimen_ids:
                result["specimen"] = specimen_ids[-1]
            resources.append(result)
    if sent := _message_time(msh, timezone):
        for resource in resources:
            if resource["resourceType"] != "Patient":  # the same patient in every message
                resource["meta"] = {"lastUpdated": sent}
    notes = [
        n for r in resources if r["resourceType"] == "Observation" for n in normalize_observation(r, codes)
    ]
    texts = [orjson.dumps(r) for r in resources]
    for resource, json in zip(resources, texts, strict=True):
        validate(resource["resourceType"], json)
    if noted is not None:
        noted.update(notes)
    return texts


@lru_cache(maxsize=4096)
def validate(resource_type: str, json: bytes) -> None:
    """Raises the R4B model's ValidationError where `json` is not a valid resource. The same
    text validates the same way, so a resource sent again (the same patient in the next
    message, a resend) is checked once; failures are not remembered and raise each time."""
    MODELS[resource_type].model_validate_json(json)


def fhir_datetime(value: str, timezone: str = "UTC") -> str | None:
    """An HL7 DTM (YYYY[MM[DD[HHMM[SS[.S]]]]][+/-ZZZZ]) as a FHIR dateTime, precision kept; a
    time without an offset gets the source's time zone (FHIR requires one)."""
    found = DTM.fullmatch(value.strip())
    if not value.strip():
        return None
    if not found:
        raise ValueError(f"time {value!r} is not an HL7 DTM (YYYYMMDDHHMMSS+ZZZZ)")
    year, month, day, hour, minute, second, fraction, offset = found.groups()
    date = "-".join(p for p in (year, month, day) if p)
    if hour is None:
        return date
    clock = f"{hour}:{minute}:{second or '00'}{fraction or ''}"
    if offset is None:
        naive = datetime.fromisoformat(f"{date}T{hour}:{minute}:{second or '00'}")
        zone = naive.replace(tzinfo=ZoneInfo(timezone)).strftime("%z")
        offset = zone
    return f"{date}T{clock}{offset[:3]}:{offset[3:]}"


def _patient(pid: Segment, systems: Mapping[str, str]) -> dict[str, Any]:
    identifiers = []
    for repeat in range(1, _repeats(pid, 3) + 1):
        value, authority, kind = _get(pid, 3, 1, repeat), _get(pid, 3, 4, repeat), _get(pid, 3, 5, repeat)
        if value:
            identifier: dict[str, Any] = {
                "system": systems.get(authority) or f"{LOCAL_SYSTEM}{authority or 'unknown'}",
                "value": value,
            }
            if kind:
                identifier["type"] = {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": kind}]
                }
            identifiers.append(identifier)
    if not identifiers:
        raise ValueError("PID-3 holds no patient identifier")
    first = identifiers[0]
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": _id("Patient", first["system"], first["value"]),
        "identifier": identifiers,
    }
    family, given = _get(pid, 5, 1), [g for g in (_get(pid, 5, 2), _get(pid, 5, 3)) if g]
    if family or given:
        patient["name"] = [{k: v for k, v in (("family", family), ("given", given)) if v}]
    if birth := _get(pid, 7):
        patient["birthDate"] = fhir_datetime(birth[:8])
    gender = {"M": "male", "F": "female", "O": "other", "U": "unknown", "A": "other"}.get(_get(pid, 8))
    if gender:
        patient["gender"] = gender
    return patient


def _report(
    obr: Segment, subject: dict[str, Any], control_id: str, n: int, when: Callable[[str], str | None]
) -> dict[str, Any]:
    # The order number with the test: labs reuse one filler number for several tests (NIST's
    # realm-cj-joeslab), and a shared id would keep only the last report of the message.
    key = _get(obr, 3, 1) or _get(obr, 2, 1) or f"{control_id}|{n}"
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": _id("DiagnosticReport", key, _get(obr, 4, 1)),
        "status": REPORT_STATUS.get(_get(obr, 25), "unknown"),
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}
        ],
        "code": _concept(obr, 4) or {"text": "unknown"},
        "subject": subject,
    }
    if effective := when(_get(obr, 7)):
        report["effectiveDateTime"] = effective
    if issued := _instant(when(_get(obr, 22))):
        report["issued"] = issued
    if filler := _get(obr, 3, 1):
        report["identifier"] = [
            {
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "FILL"}]
                },
                "value": filler,
            }
        ]
    return report


def _specimen(
    spm: Segment, subject: dict[str, Any], control_id: str, n: int, when: Callable[[str], str | None]
) -> dict[str, Any]:
    placer = _get(spm, 2, 1, subcomponent=1)  # SPM-2 is EIP: placer^filler, each an EI
    key = placer or f"{control_id}|{n}"  # with its type: one placer id can name two kinds
    specimen: dict[str, Any] = {
        "resourceType": "Specimen",
        "id": _id("Specimen", key, _get(spm, 4, 1)),
        "subject": subject,
    }
    if placer:
        specimen["identifier"] = [{"value": placer}]
    if filler := _get(spm, 2, 2, subcomponent=1):
        specimen["accessionIdentifier"] = {"value": filler}
    if kind := _concept(spm, 4):
        specimen["type"] = kind
    if collected := when(_get(spm, 17, 1)):
        specimen["collection"] = {"collectedDateTime": collected}
    if received := _instant(when(_get(spm, 18))):
        specimen["receivedTime"] = received
    return specimen


def _container(sac: Segment) -> dict[str, Any] | None:
    """A SAC segment as a Specimen.container: SAC-3 its identifier, SAC-21 its capacity and
    SAC-22 the specimen's volume in it (numbers, in SAC-24 units)."""
    container: dict[str, Any] = {}
    if identifier := _get(sac, 3, 1):
        container["identifier"] = [{"value": identifier}]
    units = {"unit": _get(sac, 24, 2) or _get(sac, 24, 1)} if _get(sac, 24, 1) or _get(sac, 24, 2) else {}
    if _get(sac, 24, 3).upper() in ("UCUM", "ANSI+") and _get(sac, 24, 1):
        units |= {"system": "http://unitsofmeasure.org", "code": _get(sac, 24, 1)}
    for field, key in ((21, "capacity"), (22, "specimenQuantity")):
        if NUMBER.fullmatch(volume := _get(sac, field)):
            container[key] = {"value": orjson.Fragment(volume.lstrip("+")), **units}
    return container or None


def _result_key(obx: Segment, scope: str, *, numbered: bool) -> tuple[str, ...]:
    """What tells a result apart in its order (or, outside one, its message or specimen): its
    code and sub-id (OBX-4), and outside an order its set ID (OBX-1)."""
    return (scope, _get(obx, 3, 1), _get(obx, 3, 3), _get(obx, 4), _get(obx, 1) if numbered else "")


def _observation(
    obx: Segment,
    subject: dict[str, Any],
    key: tuple[str, ...],
    nth: int,
    when: Callable[[str], str | None],
) -> dict[str, Any]:
    """The `nth` result of its `key` in the message: every OBX is an Observation of its own, so
    the second and later ones (10,000 readings of one code, the lines of a text report sent one
    OBX each) add their place to the id; the first keeps the id a corrected resend updates."""
    # FHIR needs a code; a result sent without one keeps its value under a code that says so.
    code = _concept(obx, 3) or {"text": f"no code in OBX-3 ({_get(obx, 2) or 'untyped'} result)"}
    result: dict[str, Any] = {
        "resourceType": "Observation",
        "id": _id("Observation", *key, *((str(nth),) if nth > 1 else ())),
        "status": RESULT_STATUS.get(_get(obx, 11), "unknown"),
        "category": [LAB],
        "code": code,
        "subject": subject,
    }
    result |= _value(obx)
    if bounds := _range(_get(obx, 7), _unit(obx)):
        result["referenceRange"] = [bounds]
    flags = [f for f in (_get(obx, 8, 1, r) for r in range(1, _repeats(obx, 8) + 1)) if f]
    if flags:
        result["interpretation"] = [
            {
                "coding": [
                    {
                        "system": INTERPRETATION,
                        "code": f,
                        **({"display": INTERPRETATIONS[f]} if f in INTERPRETATIONS else {}),
                    }
                ]
            }
            for f in flags
        ]
    if effective := when(_get(obx, 14)):
        result["effectiveDateTime"] = effective
    return result


def _value(obx: Segment) -> dict[str, Any]:
    kind, raw = _get(obx, 2), obx.raw(5)
    if not raw:
        return {}
    if _repeats(obx, 5) > 1:  # the v2-to-FHIR guide: each repeat of a text is a line of it
        if kind not in TEXT:
            return {}
        return {"valueString": "\n".join(_text(r) for r in obx.repetitions(5))}
    if kind in ("NM", "SN") and NUMBER.fullmatch(raw.strip().lstrip("^")):
        return {
            "valueQuantity": {"value": orjson.Fragment(raw.strip().lstrip("^").lstrip("+")), **_unit(obx)}
        }
    if kind in ("CE", "CWE", "CNE", "CF"):
        return {"valueCodeableConcept": _concept(obx, 5) or {"text": raw}}
    if kind in ("DT", "TS", "DTM"):
        return {"valueDateTime": fhir_datetime(raw)}
    if kind == "RP":  # a reference pointer: the pointer is its first component
        return {"valueString": _get(obx, 5, 1)}
    return {"valueString": _text(raw)}


def _text(raw: str) -> str:
    return raw.replace("\\.br\\", "\n")


def _unit(obx: Segment) -> dict[str, Any]:
    code, text, system = _get(obx, 6, 1), _get(obx, 6, 2), _get(obx, 6, 3)
    if not (code or text):
        return {}
    unit: dict[str, Any] = {"unit": text or code}
    if system.upper() in ("UCUM", "ANSI+"):
        unit |= {"system": "http://unitsofmeasure.org", "code": code}
    elif code:  # kept for harmonize.labs.codes, which makes it UCUM where it can (or drops it)
        unit |= {"system": f"urn:twinhub:hl7v2:codesystem:{system or 'local'}", "code": code}
    return unit


def _range(text: str, unit: dict[str, Any]) -> dict[str, Any] | None:
    if not text:
        return None
    found = RANGE.fullmatch(text)
    if not found:
        return {"text": text}

    def bound(value: str) -> dict[str, Any]:
        return {"value": orjson.Fragment(value.lstrip("+")), **unit}

    parts = found.groupdict()
    out: dict[str, Any] = {"text": text}
    if parts["low"] is not None:
        out |= {"low": bound(parts["low"]), "high": bound(parts["high"])}
    elif parts["below"] is not None:
        out["high"] = bound(parts["below"])
    elif parts["above"] is not None:
        out["low"] = bound(parts["above"])
    return out


def _concept(segment: Segment, field: int) -> dict[str, Any] | None:
    code, display, system = (_get(segment, field, c) for c in (1, 2, 3))
    if not (code or display):
        return None
    coding: dict[str, Any] = {}
    if code:
        coding["code"] = code
        coding["system"] = CODE_SYSTEMS.get(
            system.upper(), f"urn:twinhub:hl7v2:codesystem:{system or 'local'}"
        )
        if coding["system"] == "http://loinc.org" and not loinc_is_valid(code):
            raise ValueError(
                f"{segment.name}-{field} holds {code!r}, which is not a LOINC code (bad form or check digit)"
            )
    if display:
        coding["display"] = display
    concept: dict[str, Any] = {"coding": [coding]} if code else {}
    if display:
        concept["text"] = display
    return concept


def _message_time(msh: Segment, timezone: str) -> str | None:
    """MSH-7 as an instant; None where it is coarser than seconds or no time (then the copy
    read last wins, as for any resource without meta.lastUpdated)."""
    try:
        return _instant(fhir_datetime(_get(msh, 7), timezone))
    except ValueError:
        return None


def _instant(value: str | None) -> str | None:
    """FHIR instants need seconds and an offset: a coarser time stays only in the effective time."""
    return value if value and len(value) >= 25 else None


def _first(message: list[Segment], name: str) -> Segment | None:
    return next((s for s in message if s.name == name), None)


def _repeats(segment: Segment, field: int) -> int:
    return segment.repeats(field)


def _get(segment: Segment, field: int, component: int = 1, repeat: int = 1, subcomponent: int = 0) -> str:
    """The text at field.component of a repeat (1-based, as HL7 numbers them), '' where absent;
    with a `subcomponent`, only that one."""
    return segment.get(field, component, repeat, subcomponent)


def _id(*parts: str) -> str:
    return str(uuid.uuid5(IDS, "|".join(parts)))
