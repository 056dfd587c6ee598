"""The real `sync` flow under Prefect's test harness, and the event it emits."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from flows.sample_export import write_sample_export
from flows.sync import STORE_UPDATED, backfill, land_source, sync
from tests.support.data import write_config
from twin_store import connect


def read_store_events(source: str) -> list:  # type: ignore[type-arg]
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    event_filter = EventFilter(
        event=EventNameFilter(name=[STORE_UPDATED]),
        resource=EventResourceFilter(id=[f"twinhub.source.{source}"]),
    )
    with get_client(sync_client=True) as client:
        return list(client.read_events(filter=event_filter, limit=50).events)


def wait_for_events(source: str, n: int) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + 60
    while ((events := read_store_events(source)) and len(events) < n) or not events:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return events


@pytest.mark.slow
def test_sync_flow_lands_and_emits_store_updated(prefect_api: str, tmp_path: Path) -> None:
    written = write_sample_export(tmp_path / "export", patients=40)
    config = write_config(tmp_path, tmp_path / "export", name="flowtest")
    report = sync("flowtest", str(config))
    assert report.status == "succeeded"
    assert report.counts["inserted"] == sum(written.values())

    [event] = wait_for_events("flowtest", 1)
    assert event.payload["run_id"] == report.run_id
    assert event.payload["snapshot_id"] == report.snapshot_id
    assert event.payload["tables"]["fhir_resource"] == sum(written.values())
    assert event.payload["tables"]["patient"] == 40
    con = connect(tmp_path / "store")
    assert con.sql("SELECT status, snapshot_id FROM ingest_run").fetchall() == [
        ("succeeded", report.snapshot_id)
    ]


@pytest.mark.slow
def test_backfill_flow_rederives_the_window(prefect_api: str, tmp_path: Path) -> None:
    from datetime import UTC, datetime

    write_sample_export(tmp_path / "export", patients=20)
    config = write_config(tmp_path, tmp_path / "export", name="bftest")
    sync("bftest", str(config))
    report = backfill(
        "bftest", datetime(2020, 1, 1, tzinfo=UTC), datetime(2021, 1, 1, tzinfo=UTC), str(config)
    )
    con = connect(tmp_path / "store")
    (in_window,) = con.sql(
        "SELECT count(*) FROM fhir_resource WHERE coalesce(last_updated, "
        "TRY_CAST(coalesce(resource->>'$.effectiveDateTime', resource->>'$.period.start', "
        "resource->>'$.performedPeriod.start', resource->>'$.occurrenceDateTime', "
        "resource->>'$.onsetDateTime', resource->>'$.authoredOn') AS TIMESTAMPTZ)) "
        ">= '2020-01-01' AND coalesce(last_updated, TRY_CAST(coalesce(resource->>'$.effectiveDateTime', "
        "resource->>'$.period.start', resource->>'$.performedPeriod.start', "
        "resource->>'$.occurrenceDateTime', resource->>'$.onsetDateTime', "
        "resource->>'$.authoredOn') AS TIMESTAMPTZ)) < '2021-01-01'"
    ).fetchone()
    assert in_window > 0
    assert report.counts["unchanged"] == in_window
    assert report.counts["inserted"] == report.counts["updated"] == 0
    assert report.counts["lines_read"] == in_window + report.counts["out_of_window"]
    assert report.changed["fhir_resource"] == 0 and sum(report.changed.values()) > 0
    assert len(wait_for_events("bftest", 2)) == 2


def test_only_transient_or_unknown_failures_are_retried() -> None:
    from prefect.states import Failed

    from connectors.errors import ConfigError, SourceError, TransientError
    from flows.retries import is_retryable

    assert not is_retryable(None, None, Failed(data=SourceError("s", "path missing")))
    assert not is_retryable(None, None, Failed(data=ConfigError("sources.x", "no such source")))
    assert is_retryable(None, None, Failed(data=TransientError("commit conflict")))
    assert is_retryable(None, None, Failed(data=OSError("disk hiccup")))


def test_pipeline_surfaces_a_failure_and_stops_its_threads() -> None:
    import threading

    from flows.sync import prefetch

    def items():  # type: ignore[no-untyped-def]
        yield 1
        raise OSError("disk went away")

    before = threading.active_count()
    seen = []
    with pytest.raises(OSError, match="disk went away"):
        for item in prefetch(map(lambda x: x * 2, prefetch(prefetch(items())))):
            seen.append(item)
    assert seen == [2]
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_pipeline_stops_its_threads_when_the_consumer_fails() -> None:
    import itertools
    import threading

    from flows.sync import prefetch

    before = threading.active_count()
    with pytest.raises(RuntimeError):
        for _ in prefetch(prefetch(itertools.count())):
            raise RuntimeError("landing failed")
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_each_snapshot_names_its_run_and_a_sync_of_unchanged_input_makes_none(tmp_path: Path) -> None:
    """`twin.snapshots()` says which run and batch made each snapshot; a sync that lands nothing
    leaves the store's history as it was, while its run record still says it ran."""
    write_sample_export(tmp_path / "export", patients=30)
    config = write_config(tmp_path, tmp_path / "export")
    first = land_source.fn(str(config), "src")
    con = connect(tmp_path / "store")
    snapshots = con.sql(
        "SELECT snapshot_id, author, commit_message, commit_extra_info FROM twin.snapshots() ORDER BY 1"
    ).fetchall()
    mine = [
        (n, message, orjson.loads(extra))
        for n, _, message, extra in snapshots
        if first.run_id in (extra or "")
    ]
    assert mine and mine[-1][0] == first.snapshot_id, "the run ended at its last batch's snapshot"
    assert [message for _, message, _ in mine] == [
        f"sync src run {first.run_id} batch {n}" for n in range(1, len(mine) + 1)
    ]
    assert all(extra["run_id"] == first.run_id and extra["source"] == "src" for *_, extra in mine)
    assert {author for _, author, *_ in snapshots[1:]} == {"twinhub"}, "every commit names its maker"

    second = land_source.fn(str(config), "src")
    assert second.counts["lines_read"] == 0 and second.snapshot_id == first.snapshot_id
    assert connect(tmp_path / "store").sql("SELECT count(*) FROM twin.snapshots()").fetchone() == (
        len(snapshots),
    )
    assert connect(tmp_path / "store").sql(
        "SELECT run_id, status, snapshot_id FROM ingest_run ORDER BY started_at"
    ).fetchall() == [
        (first.run_id, "succeeded", first.snapshot_id),
        (second.run_id, "succeeded", first.snapshot_id),
    ]
