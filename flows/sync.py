"""The sync and backfill flows: pull -> harmonize -> land, per source, then tell the world and
refresh the twin models (here, or by `twinhub serve`'s trigger on the event)."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from connectors.base import Batch, Connector
from connectors.errors import InterruptedRunError
from connectors.kinds import Context, SourceConfig, source_kind
from flows.config import Settings, load_settings, mapping_files
from flows.refresh import refresh_models, served_as
from flows.retries import is_retryable
from harmonize.formats import harmonizer
from twin_store import RunReport, TwinStore, Window, prepare

log = logging.getLogger(__name__)
T = TypeVar("T")

STORE_UPDATED = "twinhub.store.updated"
on_batch: ContextVar[Callable[[RunReport], None] | None] = ContextVar("on_batch", default=None)
on_progress: ContextVar[Callable[[str], None] | None] = ContextVar("on_progress", default=None)
"""Set by the CLI to draw progress (batches landed; a connector's own news, like an export's
X-Progress); flows run the same without them."""
interrupt_requested = threading.Event()
"""Set by the CLI on Ctrl-C: whatever error the interruption surfaces as (a KeyboardInterrupt,
DuckDB's "Query interrupted"), the run ends `interrupted`, and is not retried."""


def build_connector(settings: Settings, source: SourceConfig) -> Connector:
    """The source's connector, as its kind builds it."""
    context = Context(store=settings.store.path, on_progress=on_progress.get())
    return source_kind(source.kind).build(source, context)


def harmonized(source: SourceConfig, batches: Iterator[Batch]) -> Iterator[Batch]:
    """The batches as they land, harmonized by the format of records the source's kind emits
    (its mapping files are read here, once, so a bad one fails the sync before anything lands)."""
    harmonize = harmonizer(source_kind(source.kind).records, source, mapping_files(source))
    return harmonize(batches)


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=is_retryable, cache_policy=NO_CACHE)
def land_source(config: str | None, source_name: str, window: Window | None = None) -> RunReport:
    """Pull, check and land every batch; each batch commits with its watermark, so a retry or
    a rerun after a crash resumes after the last committed batch."""
    settings = load_settings(Path(config) if config else None)
    source = settings.source(source_name)
    connector = build_connector(settings, source)
    started = time.perf_counter()
    with TwinStore(settings.store.path) as store:
        run = store.begin_run(source.name, "backfill" if window else "sync")
        try:
            since = None if window else store.watermark(source.name)
            land_batches(store, run, harmonized(source, connector.pull(since, window)), window=window)
        except BaseException as e:
            if interrupt_requested.is_set() or isinstance(e, KeyboardInterrupt):
                store.finish_run(run, "interrupted")
                run.counts["lines_read"] = store.lines_landed(run)
                raise InterruptedRunError(run.run_id, run.source, run.counts["lines_read"]) from None
            store.finish_run(run, "failed", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            run.stats.update(connector.stats)
        run.seconds = time.perf_counter() - started
        return store.finish_run(run, "succeeded")


def land_batches(
    store: TwinStore, run: RunReport, batches: Iterator[Batch], window: Window | None = None
) -> None:
    """A three-stage pipeline, one thread each: read batch N+2, check N+1, land N (its raw
    resources and the view rows of those that changed). The stages mostly run in C (gunzip,
    DuckDB) off the GIL, so the two cores stay busy and each batch still lands in order, in its
    own transaction."""
    backfill = window is not None
    for batch in prefetch(prepare(batch, backfill=backfill) for batch in prefetch(noted(batches, run))):
        store.land(run, batch, window=window)
        if interrupt_requested.is_set():  # in case the KeyboardInterrupt met code that ate it
            raise KeyboardInterrupt
        log.info("%s: %s lines landed so far", run.source, run.counts["lines_read"])
        if callback := on_batch.get():
            callback(run)
    store.make_daily_fhir(run)


def noted(batches: Iterator[Batch], run: RunReport) -> Iterator[Batch]:
    """The batches, adding what mapping noted about each (codes unmapped, ...) to the run's stats."""
    for batch in batches:
        run.stats.update(batch.stats)
        yield batch


@task(cache_policy=NO_CACHE)
def emit_store_updated(report: RunReport, project: str) -> None:
    """Announce what changed; the project's model-refresh automation subscribes to this event."""
    emit_event(
        event=STORE_UPDATED,
        resource={
            "prefect.resource.id": f"twinhub.source.{report.source}",
            "prefect.resource.name": report.source,
            "twinhub.project": project,
        },
        payload=event_payload(report),
    )


def event_payload(report: RunReport) -> dict[str, Any]:
    return {
        "source": report.source,
        "flow": report.flow,
        "run_id": report.run_id,
        "snapshot_id": report.snapshot_id,
        "tables": dict(report.changed),
        "patients": report.patients,
        "patients_changed": report.patients_changed,
        "counts": dict(report.counts),
        "resource_types": dict(report.by_type),
    }


@flow(name="sync")
def sync(source: str, config: str | None = None, refresh: bool | None = None) -> RunReport:
    """Land what is new in one source since its watermark, then refresh the enabled twin models
    (`refresh_here` decides where; None follows `[models] refresh_after_sync`)."""
    report = land_source(config, source)
    settings = load_settings(Path(config) if config else None)
    emit_store_updated(report, settings.project.name)
    if landed(report) and refresh_here(settings, refresh):
        refresh_models(config, trigger=f"sync {report.run_id}", snapshot_id=report.snapshot_id)
    return report


@flow(name="backfill")
def backfill(
    source: str, since: datetime, until: datetime, config: str | None = None, step: timedelta | None = None
) -> RunReport:
    """Re-pull a source and re-land what falls in [since, until), re-deriving even unchanged
    resources (after a mapping change or an outage), then refresh the models as a sync does.
    Leaves the sync watermark alone. Sources that query by time ask for one `step` of the
    window at a time."""
    report = land_source(config, source, Window(since=since, until=until, step=step))
    settings = load_settings(Path(config) if config else None)
    emit_store_updated(report, settings.project.name)
    if landed(report) and refresh_here(settings, None):
        refresh_models(config, trigger=f"backfill {report.run_id}", snapshot_id=report.snapshot_id)
    return report


def landed(report: RunReport) -> bool:
    """Whether the run changed the store (a run that landed nothing gives the models nothing new)."""
    return report.snapshot_id != report.started_snapshot_id


def refresh_here(settings: Settings, asked: bool | None) -> bool:
    """Whether this run refreshes the enabled models itself: yes, unless told not to (`--no-refresh`,
    `refresh_after_sync = false`) while the Prefect API it reports to serves this project's
    refresh trigger (`twinhub serve`). Without one the event would refresh nothing: then the run
    refreshes them anyway and says so in one line, so no setting leaves the models stale."""
    if not settings.models.enabled:
        return False
    if asked if asked is not None else settings.models.refresh_after_sync:
        return True
    if not PREFECT_API_URL.value():
        why = "no Prefect server is set (PREFECT_API_URL), so no `twinhub serve` sees this run's event"
    elif not _deployed(f"refresh-models/{served_as(settings.project.name)}"):
        why = f"no `twinhub serve` of project {settings.project.name!r} has served that Prefect server"
    else:
        return False
    log.warning("refreshing the models here: %s", why)
    return True


def _deployed(name: str) -> bool:
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            return False
    return True


def prefetch(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Produce the next item in a thread while the caller works on this one."""
    box: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                box.put((True, item))
            box.put((False, None))
        except BaseException as e:
            box.put((False, e))

    worker = threading.Thread(target=produce, daemon=True, name="prefetch")
    worker.start()
    try:
        while True:
            ok, item = box.get()
            if not ok:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            with contextlib.suppress(queue.Empty):
                box.get(timeout=0.1)
