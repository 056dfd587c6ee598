"""One HTTP client per FHIR server source: timeouts, connection limits, retries with backoff and
jitter, and errors that name the source, the URL and the server's own words, never a secret.

Retried: connection errors, timeouts, 429 and 5xx (after `Retry-After` when the server sends
one). Not retried: any other 4xx, which a retry cannot fix (a 401 is retried once by the
SMART auth with a fresh token).
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from pydantic import Field, field_validator

from connectors._http import RETRY_STATUS, Retrying, outcome_text
from connectors.errors import SourceError, TransientError, safe_url
from connectors.fhir.auth import AuthConfig, NoAuth, build_auth
from connectors.kinds import SourceConfig

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


class FhirServerSource(SourceConfig):
    """What every source that talks to a FHIR server shares."""

    base_url: str
    resource_types: list[str] = Field(default_factory=list)
    auth: AuthConfig = NoAuth()
    batch_mb: int = Field(default=32, ge=1, le=1024)
    timeout_seconds: float = Field(default=60, gt=0)
    max_connections: int = Field(default=4, ge=1, le=64)
    retries: int = Field(default=5, ge=0, le=20)
    backoff_seconds: float = Field(default=1.0, ge=0)
    overlap_seconds: int = Field(default=60, ge=0)
    track_deletes: bool = True

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"{url!r} is not an http(s) URL; use the server's FHIR base, e.g. https://ehr/fhir"
            )
        if parts.username or parts.password or parts.query:
            raise ValueError("base_url must not hold credentials or a query; put credentials under [auth]")
        return url.rstrip("/")

    @field_validator("resource_types")
    @classmethod
    def _check_types(cls, types: list[str]) -> list[str]:
        bad = [t for t in types if not t[:1].isupper() or not t.isalpha()]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))} are not FHIR resource types (e.g. 'Observation')")
        return types


def check_server(source: FhirServerSource) -> None:
    """Fail fast, as one line, when the server cannot be reached or the credentials cannot be read."""
    client = FhirClient(source)
    try:
        client.get_json(f"{source.base_url}/metadata")
    finally:
        client.close()


class FhirClient:
    """The source's HTTP client; safe to share between the download threads (httpx is)."""

    def __init__(self, source: FhirServerSource, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.source = source
        self.name = source.name
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._retrying = Retrying(
            source.name,
            retries=source.retries,
            backoff_seconds=source.backoff_seconds,
            sleep=sleep,
            count=self.count,
        )
        self.http = httpx.Client(
            auth=build_auth(source.name, source.auth, source.base_url, timeout=source.timeout_seconds),
            timeout=httpx.Timeout(source.timeout_seconds, connect=min(10.0, source.timeout_seconds)),
            limits=httpx.Limits(
                max_connections=source.max_connections, max_keepalive_connections=source.max_connections
            ),
            headers={"Accept": FHIR_JSON, "User-Agent": "twinhub"},
            follow_redirects=True,
        )

    def close(self) -> None:
        self.http.close()

    def get_json(self, url: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        response = self.request("GET", url, params=params)
        self.raise_for_status(response)
        return self.json(response)

    def request(
        self,
        method: str,
        url: str,
        *,
        params: httpx.QueryParams | dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        retry_on: frozenset[int] = RETRY_STATUS,
        idempotent: bool = True,
    ) -> httpx.Response:
        """Send, retrying what may pass; returns the response of any other status unchecked.

        A request that is not idempotent (a kick-off) is retried only where the server surely
        did not act on it: it was never connected, or it answered 429 or 503."""
        if not idempotent:
            retry_on = retry_on & {429, 503}
        for attempt in self._retrying.attempts(method, url, idempotent=idempotent):
            with attempt:
                response = self.http.request(method, url, params=params, headers=headers)
                attempt.check(response, retry_on)
                return response
        raise AssertionError("unreachable: the last attempt raises")

    def count(self, what: str, n: int = 1) -> None:
        """Add to the stats; download threads share them."""
        with self._stats_lock:
            self.stats[what] += n

    def download(self, url: str, dest: Path, *, with_token: bool, expected_lines: int | None) -> int:
        """Stream `url` into `dest` (kept gzip-encoded when the server sends gzip), in bounded
        memory. A body cut short is retried from the start; returns the bytes written."""
        part = dest.with_name(dest.name + ".part")
        headers = {"Accept": "application/fhir+ndjson", "Accept-Encoding": "gzip"}
        auth: Any = httpx.USE_CLIENT_DEFAULT if with_token else None
        for attempt in self._retrying.attempts("GET", url):
            with attempt, self.http.stream("GET", url, headers=headers, auth=auth) as response:
                attempt.check(response, RETRY_STATUS)
                self.raise_for_status(response)
                gzipped = response.headers.get("content-encoding", "").lower() == "gzip"
                lines = _LineCount(gzipped)
                size = 0
                with part.open("wb") as fh:
                    for chunk in response.iter_raw(1 << 20):
                        fh.write(chunk)
                        size += len(chunk)
                        lines.feed(chunk)
                if not lines.complete or (expected_lines is not None and lines.total < expected_lines):
                    raise TransientError(
                        f"{safe_url(url)} ended after {lines.total:,} of {expected_lines or '?'} lines"
                    )
                part.rename(dest.with_name(dest.name + ".gz") if gzipped else dest)
                self.count("files")
                self.count("bytes", size)
                return size
        raise AssertionError("unreachable: the last attempt raises")

    def raise_for_status(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        if response.is_stream_consumed is False:
            response.read()
        request = response.request
        hint = {
            401: "; check the source's [auth] settings and credentials",
            403: "; the credentials lack a scope or permission for this request",
            404: "; check base_url and resource_types",
        }.get(response.status_code, "")
        raise SourceError(
            self.name,
            f"{request.method} {safe_url(request.url)} answered {response.status_code} "
            f"{response.reason_phrase}: {outcome_text(response)}{hint}",
        )

    def json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            raise SourceError(
                self.name, f"{safe_url(response.request.url)} did not answer with a JSON object"
            )
        return body


class _LineCount:
    """Counts the lines of a download as it streams (decompressing a gzip body to count, and
    to prove it complete), so a body cut short is never taken for the whole file."""

    def __init__(self, gzipped: bool) -> None:
        self._inflate = zlib.decompressobj(wbits=31) if gzipped else None
        self._newlines = 0
        self._last = b"\n"

    def feed(self, raw: bytes) -> None:
        try:
            data = self._inflate.decompress(raw) if self._inflate else raw
        except zlib.error:
            raise TransientError("the gzip-encoded body is corrupt") from None
        self._newlines += data.count(b"\n")
        self._last = data[-1:] or self._last

    @property
    def complete(self) -> bool:
        return self._inflate is None or self._inflate.eof

    @property
    def total(self) -> int:
        return self._newlines + (self._last != b"\n")


def server_time(response: httpx.Response) -> datetime:
    """The server's clock from its Date header (our own clock when it sends none)."""
    value = response.headers.get("date")
    if value:
        try:
            return email.utils.parsedate_to_datetime(value).astimezone(UTC)
        except (TypeError, ValueError):
            pass
    return datetime.now(UTC)


def next_link(bundle: dict[str, Any]) -> str | None:
    """Bundle.link[relation=next], exactly as the server gave it."""
    for link in bundle.get("link", []):
        if link.get("relation") == "next":
            return str(link["url"])
    return None
