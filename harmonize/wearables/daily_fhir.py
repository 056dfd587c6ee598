"""The daily FHIR of wearable rollups, made so that one patient's bad day never stops the rest.

`daily_resources` makes a batch's Observations, Devices and Provenances and raises for the
first that fails. Here they are made a patient at a time and put through the same structural
checks the store runs on every resource it lands (`harmonize.fhir_checks`): a patient whose
resources fail (an id that is no FHIR id, a value FHIR cannot hold) has its days returned as
problems with the reason, to be quarantined, and everyone else's FHIR lands. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from connectors.base import PROBLEM_SCHEMA, records_from
from harmonize.fhir_checks import check_resources
from harmonize.wearables.metrics import DAILY_SCHEMA, daily_resources

ORIGIN = "wearable_daily"
"""The quarantine's `file` for a day whose FHIR failed: the table it was made from."""


@dataclass(frozen=True, kw_only=True)
class DailyFhir:
    resources: list[bytes]
    """The FHIR of the days that passed, ready to land."""
    problems: pa.Table
    """One row per day whose FHIR failed (PROBLEM_SCHEMA), with the reason."""
    failed: pa.Table
    """Those days (DAILY_SCHEMA): no Observation of theirs landed."""


def daily_fhir(days: pa.Table, recorded: datetime, activity: str) -> DailyFhir:
    """The FHIR of `days` (see `daily_resources`), each patient's checked on its own."""
    days = days.cast(DAILY_SCHEMA)
    keys = pc.binary_join_element_wise(days["source"], days["patient_id"], "\x00")
    made: list[list[bytes]] = []
    rows: list[pa.Table] = []
    reasons: list[str | None] = []
    for key in pc.unique(keys).to_pylist():
        group = days.filter(pc.equal(keys, key))
        rows.append(group)
        try:
            made.append(daily_resources(group, recorded, activity))
            reasons.append(None)
        except ValueError as e:  # pydantic's ValidationError is one
            made.append([])
            reasons.append(_first_lines(str(e)))
    records = records_from(
        [(str(g), n, r.decode()) for g, resources in enumerate(made) for n, r in enumerate(resources)]
    )
    problems = check_resources(records).problems
    for group, reason in zip(problems["file"].to_pylist(), problems["reason"].to_pylist(), strict=True):
        reasons[int(group)] = reasons[int(group)] or reason
    good = [r for resources, reason in zip(made, reasons, strict=True) if reason is None for r in resources]
    bad = [(group, reason) for group, reason in zip(rows, reasons, strict=True) if reason is not None]
    failed = pa.concat_tables([group for group, _ in bad]) if bad else DAILY_SCHEMA.empty_table()
    return DailyFhir(
        resources=good,
        problems=pa.Table.from_pylist(
            [_problem(row, reason) for group, reason in bad for row in group.to_pylist()], PROBLEM_SCHEMA
        ),
        failed=failed,
    )


def _problem(row: dict[str, object], reason: str) -> dict[str, object]:
    return {
        "file": ORIGIN,
        "line_no": 0,
        "reason": (
            f"the daily FHIR of {row['metric']} on {row['day']} for patient {row['patient_id']!r} of source "
            f"{row['source']} fails the checks ({reason}); its samples and daily row stay, without an "
            "Observation"
        ),
        "raw": orjson.dumps(row, default=str).decode(),
    }


def _first_lines(message: str) -> str:
    """A validation error's gist: pydantic's first error, without the rest of its report."""
    return "; ".join(line.strip() for line in message.splitlines()[:3])
