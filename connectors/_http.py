"""What the HTTP clients of every source share: one retry policy, and reading what a server said.

Retried: connection errors, timeouts and the statuses a client names (429 and 5xx by default),
after the server's `Retry-After` when it sends one, else after an exponential backoff with full
jitter. A request that is not idempotent is retried only where the server surely did not act on
it. Errors name the request without its query (it may hold search terms or a signed-URL token).
"""

from __future__ import annotations

import email.utils
import logging
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from connectors.errors import TransientError, safe_url

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 600.0


class Retrying:
    """The retry policy of one source's client: how often, how long to wait, what to count."""

    def __init__(
        self,
        source: str,
        *,
        retries: int,
        backoff_seconds: float,
        sleep: Callable[[float], None],
        count: Callable[[str], None],
        explain: Callable[[httpx.Response], str] | None = None,
    ) -> None:
        """`explain` says what a failed response means, for logs and errors (default: the
        server's own words, `outcome_text`); `count` is told of every retry."""
        self.source = source
        self.explain = explain or outcome_text
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self._sleep = sleep
        self._count = count

    def attempts(self, method: str, url: str, *, idempotent: bool = True) -> Iterator[Attempt]:
        """Attempts at one request: use each as a context manager around the request. One that
        fails transiently waits, then the next is yielded; the last one raises TransientError."""
        failures = 0
        while True:
            attempt = Attempt(
                last=failures == self.retries,
                what=f"source {self.source!r}: {method} {safe_url(url)}",
                idempotent=idempotent,
                explain=self.explain,
            )
            yield attempt
            if attempt.again:
                continue
            if not attempt.failure:
                return
            wait = attempt.retry_after
            if wait is None:
                wait = random.uniform(0, min(60.0, self.backoff_seconds * 2**failures))
            failures += 1
            self._count("retries")
            log.warning(
                "%s: %s %s %s; retry %d of %d in %.1f s",
                self.source,
                method,
                safe_url(url),
                attempt.failure,
                failures,
                self.retries,
                wait,
            )
            self._sleep(wait)


class Attempt:
    """One try: turns a transient failure into a wait, or, on the last try, an error."""

    def __init__(
        self, *, last: bool, what: str, idempotent: bool, explain: Callable[[httpx.Response], str]
    ) -> None:
        self.last = last
        self.explain = explain
        self.what = what
        self.idempotent = idempotent
        self.failure = ""
        self.again = False
        self.retry_after: float | None = None

    def check(self, response: httpx.Response, retry_on: frozenset[int], *, wait: float | None = None) -> None:
        """Fail this try when the response's status is one to retry (after `wait`, or the
        server's Retry-After)."""
        if response.status_code in retry_on:
            if isinstance(response.stream, httpx.SyncByteStream):
                response.read()
            raise _RetryableError(response, wait)

    def repeat(self) -> None:
        """Try again at once, not counted as a failure (after refreshing an expired token)."""
        raise _RepeatError

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: object) -> bool:
        if isinstance(e, _RepeatError):
            self.again = True
            return True
        if isinstance(e, _RetryableError):
            response = e.response
            self.failure = (
                f"answered {response.status_code} {response.reason_phrase}: {self.explain(response)}"
            )
            self.retry_after = e.wait if e.wait is not None else retry_after(response)
        elif isinstance(e, TransientError):
            self.failure = str(e)
        elif isinstance(e, httpx.TransportError):
            self.failure = f"failed ({type(e).__name__})"  # its text may repeat the URL's query
            if not self.idempotent and not isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
                raise TransientError(
                    f"{self.what} {self.failure}; not retried, as the server may have acted on it"
                ) from None
        else:
            return False
        if self.last:
            raise TransientError(f"{self.what}: gave up after retries; the last try {self.failure}") from None
        return True


class _RetryableError(Exception):
    def __init__(self, response: httpx.Response, wait: float | None) -> None:
        self.response = response
        self.wait = wait


class _RepeatError(Exception):
    pass


def retry_after(response: httpx.Response) -> float | None:
    """Seconds the server asked us to wait (delta-seconds or an HTTP date), capped."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when - datetime.now(UTC)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def json_object(response: httpx.Response) -> dict[str, Any]:
    """The response's JSON object, or {} when its body is not one (an error page, say)."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def outcome_text(response: httpx.Response) -> str:
    """The server's explanation: OperationOutcome issues, an OAuth error, or the start of the body."""
    try:
        body = orjson.loads(response.content)
    except (orjson.JSONDecodeError, httpx.ResponseNotRead):
        body = None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issues = [
            f"{i.get('severity', 'error')}: "
            + (i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code", "?"))
            for i in body.get("issue", [])
        ]
        return "; ".join(issues) or "an empty OperationOutcome"
    if isinstance(body, dict) and "error" in body:
        return f"{body['error']}: {body.get('error_description', '')}".rstrip(": ")
    try:
        text = " ".join(response.text.split())
    except httpx.ResponseNotRead:
        return "no details"
    return text[:200] or "no details"
