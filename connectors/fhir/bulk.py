"""FHIR Bulk Data `$export`: kick off, poll, download every file, land it, clean up.

The job lives in the watermark from the moment the server accepts it, so a sync killed while
the server works, while a file downloads or while it lands re-polls the same job and skips the
lines already landed. A job the server has forgotten is started again with the same `_since`.
Once everything landed, the manifest's `transactionTime` becomes the next `_since`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
import orjson
import pyarrow as pa
from pydantic import Field, model_validator
from xxhash import xxh3_64_hexdigest

from connectors._files import open_maybe_gzipped
from connectors._http import outcome_text, retry_after
from connectors.base import DELETION_SCHEMA, RECORD_SCHEMA, Batch, Watermark, Window
from connectors.errors import SourceError, safe_url
from connectors.fhir.client import FhirClient, FhirServerSource, check_server
from connectors.fhir.history import Deletion, deleted_entry, deletions_table, history_deletions, iso
from connectors.fhir.ndjson import line_chunks, records_table
from connectors.kinds import SourceKind

log = logging.getLogger(__name__)

EXPIRED = frozenset({404, 410})
READ_HINT = 4 << 20
FIRST_BATCH = 4 << 20
DOWNLOADS_AHEAD = 2


class FhirBulkSource(FhirServerSource):
    """Config of a `fhir-bulk` source."""

    kind: Literal["fhir-bulk"]
    level: Literal["system", "patient", "group"] = "system"
    group_id: str | None = None
    type_filters: list[str] = Field(default_factory=list)
    """Sent as `_typeFilter`, e.g. "Observation?category=laboratory"."""
    since: datetime | None = None
    """`_since` of the first export (default: everything)."""
    poll_seconds: float = Field(default=5.0, gt=0)
    """Wait between status polls when the server sends no Retry-After."""
    max_poll_seconds: float = Field(default=120.0, gt=0)
    max_wait_minutes: float = Field(default=360.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> FhirBulkSource:
        if (self.level == "group") != (self.group_id is not None):
            raise ValueError("group_id is required with level = 'group', and only then")
        return self


class FhirBulkConnector:
    def __init__(
        self,
        source: FhirBulkSource,
        *,
        landing: Path,
        on_progress: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = source.name
        self.source = source
        self.landing = landing
        self.stats: Counter[str] = Counter()
        self._progress = on_progress or (lambda message: log.info("%s: %s", self.name, message))
        self._sleep = sleep

    def check(self) -> None:
        check_server(self.source)

    def pull(self, since: Watermark | None, window: Window | None = None) -> Iterator[Batch]:
        state = dict(since or {})
        with closing(FhirClient(self.source, sleep=self._sleep)) as client:
            try:
                yield from self._export(client, state, window)
            finally:
                self.stats.update(client.stats)

    def _export(self, client: FhirClient, state: dict[str, Any], window: Window | None) -> Iterator[Batch]:
        if finished := state.pop("finished_job", None):
            self._delete_job(client, finished)
        export_since = window.since if window else _since(state.get("since")) or self.source.since
        job = None if window else state.get("job")
        if job is not None:
            self._progress(f"resuming export job {safe_url(job['status_url'])}")
            client.count("resumed")
        manifest = None
        while manifest is None:
            if job is None:
                job = self._kickoff(client, export_since)
                yield self._checkpoint(state, job)  # saved before the long wait
            manifest = self._poll(client, job)
            if manifest is None:
                log.warning(
                    "%s: the server no longer knows export job %s; starting a new one",
                    self.name,
                    safe_url(job["status_url"]),
                )
                job = None  # and a new export with the same _since
        assert job is not None
        if isinstance(manifest, str):  # "failed"
            yield self._checkpoint(state, None)
            raise SourceError(
                self.name,
                f"export job {safe_url(job['status_url'])} failed (see above); "
                "the next sync starts a new export",
            )
        folder = self.landing / xxh3_64_hexdigest(job["status_url"])
        folder.mkdir(parents=True, exist_ok=True)
        with_token = bool(manifest.get("requiresAccessToken", True))
        files = [(f"out{i}", entry) for i, entry in enumerate(manifest.get("output", []))]
        files += [(f"err{i}", entry) for i, entry in enumerate(manifest.get("error", []))]
        rest = yield from self._land_files(client, state, job, folder, files, with_token)
        deletions = None if window else self._deletions(client, manifest, export_since, folder, with_token)
        state.pop("job", None)
        if not window:
            state["since"] = manifest["transactionTime"]
            # The server's copy is deleted by the next sync, once this last batch surely landed.
            state["finished_job"] = job["status_url"]
        yield Batch(
            records=pa.concat_tables(rest) if rest else RECORD_SCHEMA.empty_table(),
            deletions=deletions if deletions is not None else DELETION_SCHEMA.empty_table(),
            watermark=_snapshot(state),
        )
        shutil.rmtree(folder, ignore_errors=True)  # every record is in the batches already
        if window:
            self._delete_job(client, job["status_url"])

    def _kickoff(self, client: FhirClient, since: datetime | None) -> dict[str, Any]:
        base = self.source.base_url
        url = {"system": f"{base}/$export", "patient": f"{base}/Patient/$export"}.get(
            self.source.level, f"{base}/Group/{self.source.group_id}/$export"
        )
        params = {}
        if self.source.resource_types:
            params["_type"] = ",".join(self.source.resource_types)
        if since:
            params["_since"] = iso(since)
        if self.source.type_filters:
            params["_typeFilter"] = ",".join(self.source.type_filters)
        response = client.request(
            "GET",
            url,
            params=params,
            headers={"Prefer": "respond-async", "Accept": "application/fhir+json"},
            idempotent=False,  # a retried kick-off could start a second export
        )
        client.raise_for_status(response)
        status_url = response.headers.get("content-location")
        if response.status_code != 202 or not status_url:
            raise SourceError(
                self.name,
                f"{safe_url(url)} answered {response.status_code} without a Content-Location to poll; "
                "is Bulk Data $export enabled for this client (and level)?",
            )
        log.info("%s: export job started at %s", self.name, safe_url(status_url))
        client.count("exports")
        return {"status_url": status_url, "since": iso(since) if since else None, "files": {}}

    def _poll(self, client: FhirClient, job: dict[str, Any]) -> dict[str, Any] | Literal["failed"] | None:
        """The manifest; None when the job has expired; "failed" when the server says it failed."""
        deadline = time.monotonic() + self.source.max_wait_minutes * 60
        wait = self.source.poll_seconds
        while True:
            # A 5xx here may say the job failed: retried only when the server says it is passing.
            response = client.request("GET", job["status_url"], retry_on=frozenset({408, 429}))
            if response.status_code in EXPIRED:
                return None
            if response.status_code == 200:
                return _checked_manifest(self.name, client.json(response))
            if response.status_code >= 500 and _passing(response):
                client.count("retries")
                log.warning("%s: polling the export: %s", self.name, outcome_text(response))
            elif response.status_code != 202:
                log.error("%s: export job failed: %s", self.name, outcome_text(response))
                return "failed"
            else:
                self._progress(f"export {response.headers.get('x-progress', 'in progress')}")
            if time.monotonic() > deadline:
                raise SourceError(
                    self.name,
                    f"the export is still running after {self.source.max_wait_minutes:g} minutes; run the "
                    "sync again to keep waiting for the same job, or raise max_wait_minutes",
                )
            after = retry_after(response)
            self._sleep(min(after if after is not None else wait, self.source.max_poll_seconds))
            wait = min(wait * 1.5, self.source.max_poll_seconds)

    def _land_files(
        self,
        client: FhirClient,
        state: dict[str, Any],
        job: dict[str, Any],
        folder: Path,
        files: list[tuple[str, dict[str, Any]]],
        with_token: bool,
    ) -> Generator[Batch, None, list[pa.Table]]:
        """Download the files a few ahead while landing them in order. Batches span files (few
        commits for many small files), and what is pending lands before waiting on a download,
        so a kill loses little. Returns the records left for the final batch."""
        todo = [(key, entry) for key, entry in files if not job["files"].get(key, {}).get("complete")]
        pool = ThreadPoolExecutor(max_workers=min(DOWNLOADS_AHEAD, self.source.max_connections))
        ahead: dict[int, Future[Path]] = {}

        def fetch(i: int) -> None:
            if i < len(todo):
                ahead[i] = pool.submit(self._fetch, client, folder, *todo[i], with_token)

        for i in range(DOWNLOADS_AHEAD):
            fetch(i)
        limit = min(FIRST_BATCH, self.source.batch_mb << 20)
        chunks: list[pa.Table] = []
        size = 0
        try:
            for i, (key, entry) in enumerate(todo):
                path = ahead.pop(i)
                fetch(i + DOWNLOADS_AHEAD)
                if chunks and not path.done():
                    yield self._batch(state, job, chunks)
                    chunks, size = [], 0
                for chunk in self._file_chunks(job, key, entry, path.result()):
                    chunks.append(chunk)
                    size += chunk["raw"].nbytes
                    if size >= limit:
                        yield self._batch(state, job, chunks)
                        chunks, size = [], 0
                        limit = min(2 * limit, self.source.batch_mb << 20)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return chunks

    def _fetch(
        self, client: FhirClient, folder: Path, key: str, entry: dict[str, Any], with_token: bool
    ) -> Path:
        """The file on disk: kept from an earlier try, or downloaded now."""
        name = f"{key}-{entry.get('type', 'OperationOutcome')}.ndjson"
        for path in (folder / name, folder / f"{name}.gz"):
            if path.exists():
                return path
        self._progress(f"downloading {entry.get('type')} ({entry.get('count', '?')} resources)")
        client.download(entry["url"], folder / name, with_token=with_token, expected_lines=entry.get("count"))
        return next(p for p in (folder / name, folder / f"{name}.gz") if p.exists())

    def _file_chunks(
        self, job: dict[str, Any], key: str, entry: dict[str, Any], path: Path
    ) -> Iterator[pa.Table]:
        """The file's lines after those already landed; `job` notes how far each chunk reaches."""
        skip = job["files"].get(key, {"lines": 0})["lines"]
        label = safe_url(entry["url"])
        with open_maybe_gzipped(path) as fh:
            for first_line, lines in line_chunks(fh, skip=skip, hint=READ_HINT):
                job["files"][key] = {"lines": first_line - 1 + len(lines), "complete": False}
                yield records_table(label, first_line, lines)
        job["files"][key] = {"lines": job["files"].get(key, {"lines": skip})["lines"], "complete": True}

    def _deletions(
        self,
        client: FhirClient,
        manifest: dict[str, Any],
        since: datetime | None,
        folder: Path,
        with_token: bool,
    ) -> pa.Table | None:
        """What was deleted since `since`: the manifest's `deleted` list where the server gives
        one, else each type's `_history` (when track_deletes)."""
        if since is None or not self.source.track_deletes:
            return None
        if "deleted" in manifest:
            return self._manifest_deletions(client, manifest, since, folder, with_token)
        types: list[str | None] = [*self.source.resource_types] or [None]
        overlap = timedelta(seconds=self.source.overlap_seconds)
        found = [history_deletions(client, rtype, since - overlap) for rtype in types]
        tables = [table for table, _ in filter(None, found)]
        return pa.concat_tables(tables) if tables else None

    def _manifest_deletions(
        self, client: FhirClient, manifest: dict[str, Any], since: datetime, folder: Path, with_token: bool
    ) -> pa.Table:
        """Bulk Data `deleted` files: Bundles whose DELETE entries name what went away since
        `since`."""
        rows: list[Deletion] = []
        for i, entry in enumerate(manifest["deleted"]):
            path = self._fetch(client, folder, f"deleted{i}", {**entry, "type": "Bundle"}, with_token)
            with open_maybe_gzipped(path) as fh:
                for line_no, line in enumerate(fh, 1):
                    try:
                        bundle = orjson.loads(line) if line.strip() else {}
                    except orjson.JSONDecodeError:
                        raise SourceError(
                            self.name, f"line {line_no} of {safe_url(entry['url'])} (deleted) is not JSON"
                        ) from None
                    origin = safe_url(entry["url"])
                    rows += filter(None, (deleted_entry(e, since, origin) for e in bundle.get("entry", [])))
        return deletions_table(rows)

    def _delete_job(self, client: FhirClient, status_url: str) -> None:
        """Tell the server it may drop a landed export's files."""
        try:
            client.request("DELETE", status_url)
        except Exception as e:  # the job expires on its own; never fail a sync over it
            log.warning("%s: could not delete export job (%s); it will expire", self.name, type(e).__name__)

    def _checkpoint(self, state: dict[str, Any], job: dict[str, Any] | None) -> Batch:
        if job is None:
            state.pop("job", None)
        else:
            state["job"] = job
        return Batch(records=RECORD_SCHEMA.empty_table(), watermark=_snapshot(state))

    def _batch(self, state: dict[str, Any], job: dict[str, Any], chunks: list[pa.Table]) -> Batch:
        state["job"] = job
        records = pa.concat_tables(chunks) if chunks else RECORD_SCHEMA.empty_table()
        return Batch(records=records, watermark=_snapshot(state))


def _passing(response: httpx.Response) -> bool:
    """A status-poll error the server marks as passing: Retry-After, or a transient issue code
    (Bulk Data 2.0); anything else means the job failed."""
    if response.headers.get("retry-after"):
        return True
    try:
        outcome = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return False
    codes = {i.get("code") for i in outcome.get("issue", [])} if isinstance(outcome, dict) else set()
    return bool(codes & {"transient", "throttled", "timeout", "lock-error"})


def _checked_manifest(source: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest, once it has what a sync needs (else one line saying what is missing)."""
    files = [*manifest.get("output", []), *manifest.get("error", []), *manifest.get("deleted", [])]
    if not isinstance(manifest.get("transactionTime"), str) or any("url" not in f for f in files):
        raise SourceError(
            source,
            "the export manifest lacks transactionTime or a file url; the server's answer is malformed",
        )
    return manifest


def _since(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _snapshot(state: dict[str, Any]) -> Watermark:
    return orjson.loads(orjson.dumps(state))  # type: ignore[no-any-return]


def describe(watermark: Watermark) -> str:
    """How far the exports got: up to when, and the job in progress (its files landed)."""
    text = f"exported up to {watermark['since']}" if watermark.get("since") else "no export finished yet"
    if job := watermark.get("job"):
        files = job["files"].values()
        landed, lines = sum(f["complete"] for f in files), sum(f["lines"] for f in files)
        text += f"; export job {safe_url(job['status_url'])} in progress, " + (
            f"{landed} file{'s' * (landed != 1)} landed, {lines:,} lines" if files else "no file landed yet"
        )
    return text


KIND = SourceKind(
    kind="fhir-bulk",
    modality="ehr",
    summary="A FHIR server's Bulk Data `$export` (system, group or patient level), incremental by `_since`",
    config=FhirBulkSource,
    build=lambda source, context: FhirBulkConnector(
        source, landing=context.store / "landing" / source.name, on_progress=context.on_progress
    ),
    records="fhir",
    describe=describe,
)
