"""FHIR REST search: each resource type paged by the server's own `next` links.

Incremental by `_lastUpdated=ge(watermark - overlap)`. The watermark is the server's clock (its
Date header) when the last complete walk of a type began, so a resource written during a walk
is fetched again next time; the overlap covers clock skew and replicas that lag, and resources
seen twice land once (the store compares content hashes). A walk cut short resumes from the
saved `next` link, or starts over when the server has expired it. Deletions come from
`[type]/_history` where the server offers it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import parse_qsl

import httpx
import orjson
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from connectors.base import DELETION_SCHEMA, RECORD_SCHEMA, Batch, Watermark, Window
from connectors.errors import SourceError
from connectors.fhir.client import FhirClient, FhirServerSource, check_server, next_link, server_time
from connectors.fhir.history import history_deletions, iso
from connectors.fhir.ndjson import records_table
from connectors.kinds import SourceKind

log = logging.getLogger(__name__)

RESERVED = ("_lastUpdated", "_count")


class FhirSearchSource(FhirServerSource):
    """Config of a `fhir-search` source."""

    kind: Literal["fhir-search"]
    page_size: int = Field(default=500, ge=1, le=10_000)
    """Sent as `_count`; servers may cap it (Epic and Oracle Health do, see the presets)."""
    search_params: dict[str, str] = Field(default_factory=dict)
    """Extra search parameters per type, as a query string: {Observation = "category=laboratory"}."""

    @model_validator(mode="after")
    def _check(self) -> FhirSearchSource:
        if not self.resource_types:
            raise ValueError("resource_types is required for a fhir-search source, e.g. ['Patient']")
        if extra := sorted(set(self.search_params) - set(self.resource_types)):
            raise ValueError(f"search_params names types not in resource_types: {', '.join(extra)}")
        return self

    @field_validator("search_params")
    @classmethod
    def _check_params(cls, params: dict[str, str]) -> dict[str, str]:
        for rtype, query in params.items():
            names = {name for name, _ in parse_qsl(query.lstrip("?"), keep_blank_values=True)}
            if not names:
                raise ValueError(f"search_params.{rtype} {query!r} is not a query string like 'status=final'")
            if used := sorted(names & set(RESERVED)):
                raise ValueError(f"search_params.{rtype} sets {', '.join(used)}; twinhub sets those itself")
        return params


class FhirSearchConnector:
    def __init__(self, source: FhirSearchSource, *, on_progress: Callable[[str], None] | None = None) -> None:
        self.name = source.name
        self.source = source
        self.stats: Counter[str] = Counter()
        self._progress = on_progress or (lambda message: log.info("%s: %s", self.name, message))

    def check(self) -> None:
        check_server(self.source)

    def pull(self, since: Watermark | None, window: Window | None = None) -> Iterator[Batch]:
        state: dict[str, dict[str, Any]] = {t: dict(s) for t, s in (since or {}).get("types", {}).items()}
        with closing(FhirClient(self.source)) as client:
            try:
                for rtype in self.source.resource_types:
                    if window is None:
                        yield from self._sync(client, rtype, state)
                    else:
                        yield from self._backfill(client, rtype, window)
            finally:
                self.stats.update(client.stats)

    def _sync(self, client: FhirClient, rtype: str, state: dict[str, dict[str, Any]]) -> Iterator[Batch]:
        """One type since its watermark: deletions first, then the walk (resumed if cut short)."""
        st = state.setdefault(rtype, {})
        overlap = timedelta(seconds=self.source.overlap_seconds)
        deletions = DELETION_SCHEMA.empty_table()
        if self.source.track_deletes and "deletes_since" in st and "walk" not in st:
            found = history_deletions(client, rtype, datetime.fromisoformat(st["deletes_since"]) - overlap)
            if found is not None:
                deletions, checked_at = found
                st["deletes_since"] = checked_at.isoformat()
        lower = datetime.fromisoformat(st["since"]) - overlap if "since" in st else None
        walk = st.get("walk") or {}
        for records in self._walk(client, rtype, lower, walk):
            if walk["next"]:
                st["walk"] = dict(walk)
            else:
                st.pop("walk", None)
                if _whole(walk):
                    st["since"] = walk["started"]
                else:  # keep the old watermark: the next sync asks again for what was skipped
                    log.warning(
                        "%s: %s changed during the search (%s of %s matches unchanged); a server that "
                        "pages by offset may have skipped some, so the next sync asks again",
                        self.name,
                        rtype,
                        walk["unchanged"],
                        walk["total"],
                    )
                st.setdefault("deletes_since", walk["started"])
            yield Batch(records=records, deletions=deletions, watermark={"types": _copy(state)})
            deletions = DELETION_SCHEMA.empty_table()

    def _backfill(self, client: FhirClient, rtype: str, window: Window) -> Iterator[Batch]:
        """One type, one `_lastUpdated` step of the window at a time; no watermark."""
        step = window.step or (window.until - window.since)
        start = window.since
        while start < window.until:
            end = min(start + step, window.until)
            self._progress(f"{rtype} updated {start:%Y-%m-%d} to {end:%Y-%m-%d}")
            for records in self._walk(client, rtype, start, {}, until=end):
                yield Batch(records=records, watermark={})
            start = end

    def _walk(
        self,
        client: FhirClient,
        rtype: str,
        lower: datetime | None,
        walk: dict[str, Any],
        until: datetime | None = None,
    ) -> Iterator[pa.Table]:
        """Pages of one search, gathered into batches of about batch_mb. `walk` (empty, or
        saved from a walk cut short) is kept up to date as each batch is yielded: the next
        link, the server time the walk began, pages so far, matches received and announced."""
        first_params = httpx.QueryParams(
            [
                *parse_qsl(self.source.search_params.get(rtype, "").lstrip("?")),
                ("_count", str(self.source.page_size)),
                *([("_lastUpdated", f"ge{iso(lower)}")] if lower else []),
                *([("_lastUpdated", f"lt{iso(until)}")] if until else []),
            ]
        )
        fresh: dict[str, Any] = {
            "next": f"{self.source.base_url}/{rtype}",
            "started": None,
            "page": 0,
            "unchanged": 0,  # matches not updated since the walk began
            "total": None,
        }
        resuming = bool(walk)
        walk.update({**fresh, **walk})
        params: httpx.QueryParams | None = None if resuming else first_params
        chunks: list[pa.Table] = []
        size, limit = 0, self.source.batch_mb << 20
        while walk["next"]:
            response = client.request("GET", walk["next"], params=params)
            if resuming and response.status_code in (404, 410):
                log.warning("%s: the saved %s page link has expired; walking again", self.name, rtype)
                walk.update(fresh)
                params, resuming = first_params, False
                continue
            resuming = False
            client.raise_for_status(response)
            bundle = client.json(response)
            walk["started"] = walk["started"] or server_time(response).isoformat()
            walk["page"] += 1
            if walk["total"] is None and isinstance(bundle.get("total"), int):
                walk["total"] = bundle["total"]
            client.count("pages")
            label = f"{self.source.base_url}/{rtype} search page {walk['page']}"
            records, unchanged = self._records(bundle, label, datetime.fromisoformat(walk["started"]))
            walk["unchanged"] += unchanged
            chunks.append(records)
            size += records["raw"].nbytes
            walk["next"], params = next_link(bundle), None
            self._progress(f"{rtype}: page {walk['page']}, {walk['total'] or '?'} matching")
            if size >= limit or not walk["next"]:
                yield pa.concat_tables(chunks)
                chunks, size = [], 0

    def _records(self, bundle: dict[str, Any], label: str, started: datetime) -> tuple[pa.Table, int]:
        """The page's resources (matches and includes) as records, and how many matches were
        not updated since the walk began (see `_whole`)."""
        if bundle.get("resourceType") != "Bundle":
            raise SourceError(self.name, f"{label} did not answer with a Bundle")
        lines = []
        unchanged = 0
        for entry in bundle.get("entry", []):
            resource = entry.get("resource")
            mode = (entry.get("search") or {}).get("mode", "match")
            if resource is None:
                continue
            if mode == "outcome":
                self._outcome(resource)
                continue
            if mode == "match":
                updated = (resource.get("meta") or {}).get("lastUpdated")
                unchanged += not updated or datetime.fromisoformat(updated) < started
            lines.append(orjson.dumps(resource))
        return records_table(label, 1, lines) if lines else RECORD_SCHEMA.empty_table(), unchanged

    def _outcome(self, outcome: dict[str, Any]) -> None:
        """The server's notes on a search: errors stop the sync, warnings are logged."""
        issues = outcome.get("issue", [])
        text = "; ".join(str(i.get("diagnostics") or i.get("code")) for i in issues)
        if any(i.get("severity") in ("error", "fatal") for i in issues):
            raise SourceError(self.name, f"the server rejected the search: {text}")
        log.warning("%s: the server notes on a search: %s", self.name, text)


def _whole(walk: dict[str, Any]) -> bool:
    """Did the walk surely see every match the server announced (when it announced a total)?

    On a server that pages by offset, a resource updated mid-walk moves, the pages after it
    shift and one resource is skipped; the moved one may come twice. Counting only matches not
    updated since the walk began, each is seen at most once, so fewer than the total means
    something was skipped (or changed meanwhile): the watermark then stays where it was."""
    return walk["total"] is None or walk["unchanged"] >= walk["total"]


def _copy(state: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rtype: dict(st) for rtype, st in state.items()}


def describe(watermark: Watermark) -> str:
    """How far each resource type got: up to when (the next sync asks from there), or the page a
    walk cut short stopped at, or that no walk has been whole yet."""
    return "; ".join(_type_progress(t, st) for t, st in watermark.get("types", {}).items())


def _type_progress(rtype: str, st: dict[str, Any]) -> str:
    if walk := st.get("walk"):
        matching = f", {walk['total']:,} matching" if walk.get("total") is not None else ""
        return f"{rtype} walking (page {walk['page']}{matching})"
    if "since" in st:
        return f"{rtype} up to {st['since']}"
    return f"{rtype} not complete yet (it changed during the search; the next sync asks again)"


KIND = SourceKind(
    kind="fhir-search",
    modality="ehr",
    summary="A FHIR server read by search, per resource type, incremental by `_lastUpdated`",
    config=FhirSearchSource,
    build=lambda source, context: FhirSearchConnector(source, on_progress=context.on_progress),
    records="fhir",
    describe=describe,
)
