"""Mapping raw records to FHIR one by one, where each record maps whole or goes to quarantine."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import cache
from itertools import repeat
from multiprocessing import get_context
from typing import Any, Protocol

import pyarrow as pa
from pydantic import ValidationError

from connectors.base import Batch, problems_from, records_from
from harmonize.sql_on_fhir.fhirpath import SOURCE_BASE

MAPPING_ERRORS = (ValueError, IndexError, KeyError)
"""What a mapping raises for a bad record (a pydantic ValidationError is a ValueError)."""
PARALLEL_FROM = 1_000
"""A batch of at least this many records is mapped on every core: validating with the R4B
models is pure Python (~5k resources/s a core), and the GIL keeps threads to one core. Smaller
batches map in this process, where starting the workers would cost more than it saves."""

Row = tuple[str, int, str]
Mapped = tuple[list[Row], list[tuple[str, int, str, str]], Counter[str]]


class Mapper(Protocol):
    """One record's text -> its resources (JSON), validated; what normalizing did goes in
    `noted`. Raises a MAPPING_ERROR saying what is wrong. Picklable: the workers run it."""

    def __call__(self, raw: str, *, noted: Counter[str]) -> list[bytes]: ...


def map_records(batch: Batch, to_fhir: Mapper, label: str = "") -> Batch:
    """`to_fhir` applied to each record's text: its resources land, or the record is a problem
    with the reason (prefixed `<label> <number>: ` when a label is given). What the mapping
    noted is added to the batch's stats."""
    columns = (batch.records[name].to_pylist() for name in ("file", "line_no", "raw"))
    rows = list(zip(*columns, strict=True))
    cores = usable_cores()
    if len(rows) < PARALLEL_FROM or cores == 1:
        parts = [_map(to_fhir, label, rows)]
    else:  # in order, a contiguous share of the rows per core
        share = -(-len(rows) // cores)
        chunks = [rows[at : at + share] for at in range(0, len(rows), share)]
        parts = list(_workers().map(_map, repeat(to_fhir), repeat(label), chunks))
    good = [row for part in parts for row in part[0]]
    bad = [problem for part in parts for problem in part[1]]
    problems = pa.concat_tables([batch.problems, problems_from(bad)])
    noted = sum((part[2] for part in parts), Counter[str]())
    return replace(batch, records=records_from(good), problems=problems, stats=batch.stats + noted)


def _map(to_fhir: Mapper, label: str, rows: list[Row]) -> Mapped:
    good: list[Row] = []
    bad: list[tuple[str, int, str, str]] = []
    noted: Counter[str] = Counter()
    for file, number, raw in rows:
        try:
            resources = to_fhir(raw, noted=noted)
        except MAPPING_ERRORS as e:
            bad.append((file, number, f"{label} {number}: {reason(e)}" if label else reason(e), raw))
        else:
            good += [(file, number, r.decode()) for r in resources]
    return good, bad, noted


def usable_cores() -> int:
    """The cores this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@cache
def _workers() -> ProcessPoolExecutor:
    """One worker per core, started on first use and kept for the process's life. Spawned,
    not forked: the store's DuckDB runs threads in this process."""
    return ProcessPoolExecutor(max_workers=usable_cores(), mp_context=get_context("spawn"))


def reason(error: Exception) -> str:
    """One line: a validation error's first complaint and where, or the error's own text."""
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"not a valid FHIR {error.title}: {where}: {first['msg']}"
    return str(error)


def key_reference(key: str, resource_type: str = "Patient") -> str:
    """The reference to the resource a store key names: a key `<source>/<id>` names the source
    too, on the base the store's views read as that source's (`SOURCE_BASE`), a plain id the
    resource of the referring resource's own source (`Patient/<id>`)."""
    source, _, id_ = key.rpartition("/")
    return f"{SOURCE_BASE}{source}/{resource_type}/{id_}" if source else f"{resource_type}/{id_}"


def patient_reference(patient: str, system: str | None) -> dict[str, Any]:
    """The subject of a record: the Patient by id, or by identifier when the source names its
    patients in an identifier `system` (an MRN); the store then links it to the twin's Patient
    with that identifier, holding it until that Patient arrives."""
    if system is None:
        return {"reference": key_reference(patient)}
    return {"identifier": {"system": system, "value": patient}}
