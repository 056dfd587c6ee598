"""A realistic synthetic FHIR R4 Bulk Data export, so the demo runs without ../shared.

Seeded, so the same arguments always write the same files. Patients get encounters, conditions,
vital signs and labs (LOINC codes, UCUM units), medications, procedures and immunizations.
"""

from __future__ import annotations

import gzip
import random
import uuid
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"

# (LOINC, display, UCUM unit, mean, sd)
VITALS = [
    ("8867-4", "Heart rate", "/min", 74, 9),
    ("8310-5", "Body temperature", "Cel", 36.9, 0.3),
    ("29463-7", "Body weight", "kg", 78, 14),
    ("8302-2", "Body height", "cm", 171, 9),
    ("9279-1", "Respiratory rate", "/min", 15, 2),
]
LABS = [
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 195, 30),
    ("2085-9", "HDL Cholesterol", "mg/dL", 52, 12),
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 98, 18),
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 5.7, 0.7),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 0.95, 0.2),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 14, 1.4),
]
CONDITIONS = [
    ("38341003", "Hypertensive disorder, systemic arterial"),
    ("44054006", "Diabetes mellitus type 2"),
    ("195967001", "Asthma"),
    ("55822004", "Hyperlipidemia"),
]
MEDICATIONS = [
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("860975", "metformin 500 MG Oral Tablet"),
]
PROCEDURES = [("430193006", "Medication reconciliation"), ("171207006", "Depression screening")]
VACCINES = [("140", "Influenza, seasonal, injectable, preservative free"), ("113", "Td (adult)")]


def write_sample_export(folder: Path, *, patients: int = 200, seed: int = 7) -> dict[str, int]:
    """Write `<Type>.ndjson.gz` files into `folder`; returns resources written per type."""
    rng = random.Random(seed)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _ in range(patients):
        _patient(rng, out)
    folder.mkdir(parents=True, exist_ok=True)
    for resource_type, resources in out.items():
        lines = b"".join(orjson.dumps(resource) + b"\n" for resource in resources)
        (folder / f"{resource_type}.ndjson.gz").write_bytes(gzip.compress(lines, mtime=0))
    return {t: len(r) for t, r in sorted(out.items())}


def _id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _patient(rng: random.Random, out: dict[str, list[dict[str, Any]]]) -> None:
    pid = _id(rng)
    side = random.Random(pid)  # race and smoking: their own draws, the rest of the export unchanged
    born = date(1940, 1, 1) + timedelta(days=rng.randrange(365 * 60))
    gender = rng.choice(["male", "female"])
    out["Patient"].append(
        {
            "resourceType": "Patient",
            "id": pid,
            "meta": {"lastUpdated": "2026-01-15T09:30:00Z"},
            "identifier": [
                {
                    "type": _coding(
                        "http://terminology.hl7.org/CodeSystem/v2-0203",
                        "MR",
                        "Medical record number",
                    ),
                    "system": "urn:twinhub:sample:mrn",
                    "value": f"MRN{rng.randrange(10**7):07d}",
                }
            ],
            "name": [
                {
                    "use": "official",
                    "family": rng.choice(["Rivera", "Chen", "Okafor", "Novak", "Smith"]),
                    "given": [rng.choice(["Alex", "Sam", "Maria", "Wei", "Amara", "Jonas"])],
                }
            ],
            "gender": gender,
            "birthDate": born.isoformat(),
            "extension": [_race(side)],
            "address": [{"city": "Springfield", "state": "MA", "postalCode": "01101", "country": "US"}],
        }
    )
    subject = {"reference": f"Patient/{pid}"}
    problems = rng.sample(CONDITIONS, rng.randrange(0, 3))
    start = datetime(2018, 1, 1, tzinfo=UTC)
    for visit in range(rng.randrange(2, 8)):
        when = start + timedelta(days=rng.randrange(365 * 8), minutes=rng.randrange(600))
        eid = _id(rng)
        ref = {"reference": f"Encounter/{eid}"}
        stamp = when.isoformat(timespec="seconds")
        out["Encounter"].append(
            {
                "resourceType": "Encounter",
                "id": eid,
                "status": "finished",
                "class": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": "AMB",
                },
                "type": [_coding(SNOMED, "185349003", "Encounter for check up")],
                "subject": subject,
                "period": {
                    "start": stamp,
                    "end": (when + timedelta(minutes=30)).isoformat(timespec="seconds"),
                },
            }
        )
        for code, display, unit, mean, sd in VITALS:
            out["Observation"].append(
                _observation(rng, "vital-signs", code, display, unit, mean, sd, subject, ref, stamp)
            )
        out["Observation"].append(
            {
                "resourceType": "Observation",
                "id": _id(rng),
                "status": "final",
                "category": [
                    _coding(
                        "http://terminology.hl7.org/CodeSystem/observation-category",
                        "vital-signs",
                        "Vital Signs",
                    )
                ],
                "code": _coding(LOINC, "85354-9", "Blood pressure panel"),
                "subject": subject,
                "encounter": ref,
                "effectiveDateTime": stamp,
                "component": [
                    {
                        "code": _coding(LOINC, "8480-6", "Systolic blood pressure"),
                        "valueQuantity": {
                            "value": round(rng.gauss(124, 14)),
                            "unit": "mm[Hg]",
                            "system": UCUM,
                            "code": "mm[Hg]",
                        },
                    },
                    {
                        "code": _coding(LOINC, "8462-4", "Diastolic blood pressure"),
                        "valueQuantity": {
                            "value": round(rng.gauss(79, 9)),
                            "unit": "mm[Hg]",
                            "system": UCUM,
                            "code": "mm[Hg]",
                        },
                    },
                ],
            }
        )
        if visit % 2 == 0:
            for code, display, unit, mean, sd in LABS:
                out["Observation"].append(
                    _observation(rng, "laboratory", code, display, unit, mean, sd, subject, ref, stamp)
                )
        if visit == 0:
            for code, display in problems:
                out["Condition"].append(
                    {
                        "resourceType": "Condition",
                        "id": _id(rng),
                        "clinicalStatus": _coding(
                            "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "active",
                            "Active",
                        ),
                        "verificationStatus": _coding(
                            "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                            "confirmed",
                            "Confirmed",
                        ),
                        "code": _coding(SNOMED, code, display),
                        "subject": subject,
                        "encounter": ref,
                        "onsetDateTime": stamp,
                        "recordedDate": stamp,
                    }
                )
                if code in ("38341003", "44054006"):
                    rx = MEDICATIONS[0] if code == "38341003" else MEDICATIONS[1]
                    out["MedicationRequest"].append(
                        {
                            "resourceType": "MedicationRequest",
                            "id": _id(rng),
                            "status": "active",
                            "intent": "order",
                            "medicationCodeableConcept": _coding(RXNORM, *rx),
                            "subject": subject,
                            "encounter": ref,
                            "authoredOn": stamp,
                        }
                    )
        code, display = rng.choice(PROCEDURES)
        out["Procedure"].append(
            {
                "resourceType": "Procedure",
                "id": _id(rng),
                "status": "completed",
                "code": _coding(SNOMED, code, display),
                "subject": subject,
                "encounter": ref,
                "performedPeriod": {"start": stamp, "end": stamp},
            }
        )
        if visit == 0:
            out["Observation"].append(_smoking(side, subject, ref, stamp))
        if rng.random() < 0.4:
            code, display = rng.choice(VACCINES)
            out["Immunization"].append(
                {
                    "resourceType": "Immunization",
                    "id": _id(rng),
                    "status": "completed",
                    "vaccineCode": _coding(CVX, code, display),
                    "patient": subject,
                    "encounter": ref,
                    "occurrenceDateTime": stamp,
                    "primarySource": True,
                }
            )


RACES = [
    ("2106-3", "White", 70),
    ("2054-5", "Black or African American", 14),
    ("2028-9", "Asian", 7),
    ("2131-1", "Other Race", 9),
]
SMOKING = [
    ("266919005", "Never smoker", 60),
    ("8517006", "Former smoker", 25),
    ("449868002", "Current every day smoker", 15),
]


def _race(rng: random.Random) -> dict[str, Any]:
    ((code, display, _),) = rng.choices(RACES, weights=[w for *_, w in RACES])
    return {
        "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
        "extension": [
            {
                "url": "ombCategory",
                "valueCoding": {
                    "system": "urn:oid:2.16.840.1.113883.6.238",
                    "code": code,
                    "display": display,
                },
            },
            {"url": "text", "valueString": display},
        ],
    }


def _smoking(
    rng: random.Random, subject: dict[str, str], encounter: dict[str, str], when: str
) -> dict[str, Any]:
    ((code, display, _),) = rng.choices(SMOKING, weights=[w for *_, w in SMOKING])
    return {
        "resourceType": "Observation",
        "id": _id(rng),
        "status": "final",
        "category": [
            _coding("http://terminology.hl7.org/CodeSystem/observation-category", "survey", "Survey")
        ],
        "code": _coding(LOINC, "72166-2", "Tobacco smoking status"),
        "subject": subject,
        "encounter": encounter,
        "effectiveDateTime": when,
        "valueCodeableConcept": _coding(SNOMED, code, display),
    }


def _observation(
    rng: random.Random,
    category: str,
    code: str,
    display: str,
    unit: str,
    mean: float,
    sd: float,
    subject: dict[str, str],
    encounter: dict[str, str],
    stamp: str,
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": _id(rng),
        "status": "final",
        "category": [
            _coding("http://terminology.hl7.org/CodeSystem/observation-category", category, category)
        ],
        "code": _coding(LOINC, code, display),
        "subject": subject,
        "encounter": encounter,
        "effectiveDateTime": stamp,
        "issued": stamp,
        "valueQuantity": {
            "value": round(max(rng.gauss(mean, sd), 0.1), 2),
            "unit": unit,
            "system": UCUM,
            "code": unit,
        },
    }
