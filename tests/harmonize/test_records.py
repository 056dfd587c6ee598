"""A large batch maps on every core: the same resources, problems and notes, in the same order,
as mapping it in this process."""

from __future__ import annotations

import pyarrow as pa
import pytest

from connectors.base import RECORD_SCHEMA, Batch
from connectors.labs.hl7v2 import Hl7v2Source
from harmonize import records
from harmonize.labs.hl7v2 import resources_from_messages
from tests.support.hl7v2 import MESSAGE

SOURCE = Hl7v2Source(name="lab", kind="hl7v2", path="unused")  # type: ignore[arg-type]


def messages(n: int) -> Batch:
    """`n` distinct copies of one message (a local code added: a note); every 97th is broken
    (no MSH segment)."""
    message = MESSAGE + "\rOBX|4|NM|GLU^Glucose^L||5.1|mmol/L|||||F"
    texts = [
        message.replace("MSG001", f"MSG{i}").replace("MRN123", f"MRN{i}").replace("PL1", f"PL{i}")
        for i in range(n)
    ]
    texts = [t[3:] if i % 97 == 5 else t for i, t in enumerate(texts)]
    table = pa.table(
        [
            pa.array([f"feed-{i // 500}.hl7" for i in range(n)]),
            pa.array(range(1, n + 1), pa.int64()),
            pa.array(texts),
            pa.repeat(False, n),
        ],
        schema=RECORD_SCHEMA,
    )
    return Batch(records=table, watermark={})


def test_a_large_batch_maps_on_the_workers_as_it_would_here(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = messages(records.PARALLEL_FROM + 200)
    records._workers.cache_clear()
    spread = resources_from_messages(batch, SOURCE)
    assert records._workers.cache_info().misses == 1, "the workers mapped it"

    monkeypatch.setattr(records, "PARALLEL_FROM", 10**9)
    here = resources_from_messages(batch, SOURCE)

    broken = [n for n in range(1, len(batch.records) + 1) if (n - 1) % 97 == 5]
    assert spread.records.equals(here.records)
    assert spread.problems.equals(here.problems)
    assert spread.stats == here.stats, "the notes of every worker are summed"
    assert sum(spread.stats.values()) == len(batch.records) - len(broken)
    assert spread.problems["line_no"].to_pylist() == broken
    assert all("does not start with an MSH segment" in r for r in spread.problems["reason"].to_pylist())
    # each good message: Patient, DiagnosticReport, Specimen and four Observations, in order
    assert len(spread.records) == 7 * (len(batch.records) - len(broken))
    assert spread.records["line_no"].to_pylist() == sorted(spread.records["line_no"].to_pylist())
