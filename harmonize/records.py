"""Mapping raw records to FHIR one by one, where each record maps whole or goes to quarantine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from connectors.base import Batch, problems_from, records_from

MAPPING_ERRORS = (ValueError, IndexError, KeyError)
"""What a mapping raises for a bad record (a pydantic ValidationError is a ValueError)."""


def map_records(batch: Batch, to_fhir: Callable[[str], list[bytes]], label: str = "") -> Batch:
    """`to_fhir` applied to each record's text: its resources land, or the record is a problem
    with the reason (prefixed `<label> <number>: ` when a label is given)."""
    good: list[tuple[str, int, str]] = []
    bad: list[tuple[str, int, str, str]] = []
    for file, number, raw in zip(
        batch.records["file"].to_pylist(), batch.records["line_no"].to_pylist(),
        batch.records["raw"].to_pylist(), strict=True,
    ):  # fmt: skip
        try:
            resources = to_fhir(raw)
        except MAPPING_ERRORS as e:
            bad.append((file, number, f"{label} {number}: {reason(e)}" if label else reason(e), raw))
        else:
            good += [(file, number, r.decode()) for r in resources]
    problems = pa.concat_tables([batch.problems, problems_from(bad)])
    return replace(batch, records=records_from(good), problems=problems)


def reason(error: Exception) -> str:
    """One line: a validation error's first complaint and where, or the error's own text."""
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"not a valid FHIR {error.title}: {where}: {first['msg']}"
    return str(error)


def patient_reference(patient: str, system: str | None) -> dict[str, Any]:
    """The subject of a record: the Patient by id, or by identifier when the source names its
    patients in an identifier `system` (an MRN); the store then links it to the twin's Patient
    with that identifier, holding it until that Patient arrives."""
    if system is None:
        return {"reference": f"Patient/{patient}"}
    return {"identifier": {"system": system, "value": patient}}
