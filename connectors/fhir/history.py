"""Deletions a FHIR server reports in `[type]/_history`, for sources whose reads cannot see them
(a search never returns a deleted resource; a Bulk export without a `deleted` manifest list)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import pyarrow as pa

from connectors.base import DELETION_SCHEMA
from connectors.errors import safe_url
from connectors.fhir.client import FhirClient, next_link, server_time

log = logging.getLogger(__name__)

NOT_OFFERED = frozenset({400, 403, 404, 405, 501})
Deletion = tuple[str, str, datetime, str]


def history_deletions(
    client: FhirClient, rtype: str | None, since: datetime
) -> tuple[pa.Table, datetime] | None:
    """Resources of `rtype` (None: of any type) deleted since `since`, and the server's time
    when the walk began; None (with a warning) where the server does not offer that history."""
    path = f"{rtype}/_history" if rtype else "_history"
    url: str | None = f"{client.source.base_url}/{path}"
    params: dict[str, str] | None = {"_since": iso(since), "_count": "1000"}
    rows: list[Deletion] = []
    started: datetime | None = None
    while url:
        response = client.request("GET", url, params=params)
        if started is None:
            if response.status_code in NOT_OFFERED:
                log.warning(
                    "%s: %s answered %s, so deletions of %s are not tracked (the server offers no "
                    "such history); set track_deletes = false to silence this",
                    client.name,
                    safe_url(response.request.url),
                    response.status_code,
                    rtype or "resources",
                )
                return None
            started = server_time(response)
        client.raise_for_status(response)
        client.count("pages")
        bundle = client.json(response)
        origin = safe_url(f"{client.source.base_url}/{path}")
        rows += [
            deletion
            for entry in bundle.get("entry", [])
            if (deletion := deleted_entry(entry, since, origin)) and (not rtype or deletion[0] == rtype)
        ]
        url, params = next_link(bundle), None
    assert started is not None
    return deletions_table(rows), started


def deleted_entry(entry: dict[str, Any], since: datetime, origin: str) -> Deletion | None:
    """(type, id, when, origin) of a Bundle entry that records a DELETE; None for any other.

    Without `response.lastModified` the deletion is dated `since`, the earliest it can have
    happened: a later date could remove a copy re-created after the deletion."""
    request = entry.get("request") or {}
    if request.get("method") != "DELETE":
        return None
    parts = str(request.get("url") or entry.get("fullUrl", "")).split("?")[0].strip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) < 2 or not parts[-2][:1].isupper() or not parts[-1]:
        return None
    modified = (entry.get("response") or {}).get("lastModified")
    return parts[-2], parts[-1], datetime.fromisoformat(modified) if modified else since, origin


def deletions_table(rows: list[Deletion]) -> pa.Table:
    return pa.Table.from_pylist(
        [dict(zip(DELETION_SCHEMA.names, row, strict=True)) for row in rows], schema=DELETION_SCHEMA
    )


def iso(when: datetime) -> str:
    """A FHIR instant in UTC with milliseconds."""
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
