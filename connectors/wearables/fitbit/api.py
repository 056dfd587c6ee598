"""Fitbit Web API: every connected patient's heart rate, steps, sleep, SpO2 and weight, as
wearable samples (SAMPLE_SCHEMA, in the units Fitbit sends).

Patients are connected one by one (`twinhub wearables connect`, see `oauth`); a pull walks each
connected patient by date windows from their own watermark: per kind of data, the last local
day known complete (before today in the patient's time zone, and before the day their tracker
last synced). The next sync asks again from `overlap_days` before that, since a tracker can
sync late; samples seen twice land once (the store deduplicates them).

Intraday data (per minute) takes one request per day and kind; Fitbit grants it to personal
apps and to apps it approved. With `intraday = false` steps come as daily totals and heart rate
as the daily resting rate, many days a request.

Fitbit allows 150 requests an hour per patient. The `fitbit-rate-limit-*` headers tell what is
left and when it resets: with none left, or on 429 (after `Retry-After`), the pull waits when that
is at most `max_wait_seconds`, and otherwise leaves the patient for the next sync (what it got so
far lands, with the watermark). Access tokens are refreshed when they expire or a request answers
401; a patient whose grant Fitbit refuses is reported after the others have landed.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import orjson

from connectors._http import Attempt, Retrying, json_object, retry_after
from connectors.base import RECORD_SCHEMA, Batch, Watermark, Window, problems_from
from connectors.errors import SourceError, TransientError
from connectors.kinds import SourceKind
from connectors.wearables.fitbit.config import SCOPE, Data, FitbitSource
from connectors.wearables.fitbit.oauth import (
    FitbitAccount,
    FitbitOAuth,
    PatientAuthError,
    Tokens,
    TokenStore,
    error_type,
    reconnect,
)
from connectors.wearables.fitbit.samples import (
    DAY,
    PARSERS,
    PatientContext,
    Samples,
    local_time,
    request_path,
)

log = logging.getLogger(__name__)

RANGE_DAYS: dict[str, int] = {"heart_rate": 365, "steps": 1095, "sleep": 100, "spo2": 30, "weight": 31}
"""The longest date range Fitbit answers per request, for the kinds asked for by range."""
REFRESHABLE = ("expired_token", "invalid_token", None)
"""A 401 of these kinds (None: no body) gets one refresh and a retry."""
LONG_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{24,}")
RETRY_STATUS = frozenset({408, 500, 502, 503, 504})


class _Deferred(Exception):  # noqa: N818 (not an error: the patient waits for the next sync)
    def __init__(self, wait: float) -> None:
        self.wait = wait


class FitbitConnector:
    def __init__(
        self,
        source: FitbitSource,
        tokens: TokenStore,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = source.name
        self.source = source
        self.tokens = tokens
        self.stats: Counter[str] = Counter()
        self.retrying = Retrying(
            source.name,
            retries=source.retries,
            backoff_seconds=source.backoff_seconds,
            sleep=sleep,
            count=lambda what: self.stats.update([what]),
            explain=_explain,
        )
        self._sleep = sleep
        self._clock = clock

    def check(self) -> None:
        if not self.tokens.patients():
            raise SourceError(
                self.name,
                "no patient is connected yet; connect one: "
                f"twinhub wearables connect fitbit --patient ID --source {self.name}",
            )

    def pull(self, since: Watermark | None, window: Window | None = None) -> Iterator[Batch]:
        marks: dict[str, dict[str, str]] = {p: dict(m) for p, m in (since or {}).get("patients", {}).items()}
        refused: list[str] = []
        http = httpx.Client(
            timeout=httpx.Timeout(
                self.source.timeout_seconds, connect=min(10.0, self.source.timeout_seconds)
            ),
            headers={"Accept": "application/json", "User-Agent": "twinhub"},
        )
        oauth = FitbitOAuth(self.source, self.tokens, http=http, clock=self._clock)
        try:
            for patient in self.tokens.patients():
                api = _Api(self, oauth, http, patient)
                try:
                    yield from self._pull_patient(api, patient, marks, window)
                except _Deferred as d:
                    self.stats["patients_rate_limited"] += 1
                    log.warning(
                        "%s: patient %s reached Fitbit's rate limit (resets in %.0f s, over "
                        "max_wait_seconds); the next sync goes on from here",
                        self.name,
                        patient,
                        d.wait,
                    )
                except PatientAuthError as e:
                    self.stats["patients_refused"] += 1
                    log.warning("%s", e)
                    refused.append(str(e).removeprefix(f"source {self.name!r}: "))
                else:
                    self.stats["patients"] += 1
        finally:
            http.close()
        if refused:
            raise SourceError(self.name, "; ".join(refused))

    def _pull_patient(
        self, api: _Api, patient: str, marks: dict[str, dict[str, str]], window: Window | None
    ) -> Iterator[Batch]:
        tokens = api.tokens()
        zone, tracker, scale, last_sync = self._account(api, tokens)
        today = datetime.fromtimestamp(self._clock(), zone).date()
        complete = today - DAY
        if last_sync is not None:
            complete = min(complete, last_sync - DAY)
        mine = marks.setdefault(patient, {})
        for data in self.source.data():
            if SCOPE[data] not in tokens.scopes:
                self.stats[f"{data}_not_allowed"] += 1
                log.warning("%s: patient %s did not allow %s; it is not pulled", self.name, patient, data)
                continue
            if window is not None:
                first, last = window.since.date() - DAY, min(window.until.date(), today)
            elif data in mine:
                first = date.fromisoformat(mine[data]) + DAY - self.source.overlap_days * DAY
                last = today
            else:
                first = self.source.since or today - 30 * DAY
                last = today
            ctx = PatientContext(patient, zone, scale if data == "weight" else tracker)
            yield from self._pull_data(api, ctx, data, first, last, complete, mine, marks, window)

    def _pull_data(
        self,
        api: _Api,
        ctx: PatientContext,
        data: Data,
        first: date,
        last: date,
        complete: date,
        mine: dict[str, str],
        marks: dict[str, dict[str, str]],
        window: Window | None,
    ) -> Iterator[Batch]:
        """One kind of data for one patient, window by window; a batch when enough samples
        gathered, and one at the end that carries the watermark."""
        intraday = self.source.intraday and data in ("heart_rate", "steps", "spo2")
        span = 1 if intraday else RANGE_DAYS.get(data, 1)
        samples = Samples()
        moved = False
        start = first
        while start <= last:
            end = min(start + (span - 1) * DAY, last)
            path = request_path(data, intraday, start, end)
            try:
                body = api.get(path)
            except (_Deferred, PatientAuthError, TransientError):
                if moved or samples:  # what came before lands, with its watermark
                    yield self._batch(samples, marks)
                raise
            if not isinstance(body, dict) and data != "spo2":
                raise SourceError(self.name, f"GET {path} did not answer with a JSON object")
            PARSERS[data, intraday](samples, ctx, body, path)
            self.stats[f"{data}_requests"] += 1
            done = min(end, complete)
            if window is None and done.isoformat() > mine.get(data, ""):
                mine[data] = done.isoformat()
                moved = True
            if len(samples) >= self.source.batch_samples:
                yield self._batch(samples, marks)
                samples, moved = Samples(), False
            start = end + DAY
        if moved or samples:
            yield self._batch(samples, marks)

    def _batch(self, samples: Samples, marks: dict[str, dict[str, str]]) -> Batch:
        table, reported = samples.table(), samples.table(reported=True)
        self.stats["samples"] += table.num_rows
        self.stats["daily totals beside intraday samples"] += reported.num_rows
        self.stats["problems"] += len(samples.problems)
        return Batch(
            records=RECORD_SCHEMA.empty_table(),
            samples=table,
            reported=reported,
            problems=problems_from(samples.problems),
            stats=samples.stats,
            watermark={"patients": {p: dict(m) for p, m in marks.items()}},
        )

    def _account(self, api: _Api, tokens: Tokens) -> tuple[ZoneInfo, str, str, date | None]:
        """The patient's time zone, tracker and scale names, and the day the tracker last synced."""
        zone = ZoneInfo(self.source.timezone)
        if "profile" in tokens.scopes:
            profile = api.get("/1/user/-/profile.json")
            user = profile.get("user", {}) if isinstance(profile, dict) else {}
            try:
                zone = ZoneInfo(str(user.get("timezone")))
            except (ZoneInfoNotFoundError, ValueError):
                log.warning("%s: patient %s's profile has no usable time zone", self.name, tokens.patient)
        tracker, scale, last_sync = "Fitbit", "Fitbit", None
        if "settings" in tokens.scopes:
            devices = api.get_list("/1/user/-/devices.json")
            for device in devices:
                name = f"Fitbit {device.get('deviceVersion', '')}".strip()
                if device.get("type") == "SCALE":
                    scale = name
                    continue
                tracker = name if tracker == "Fitbit" else tracker
                synced = local_time(str(device.get("lastSyncTime", "")))
                if synced is not None and (last_sync is None or synced.date() > last_sync):
                    last_sync = synced.date()
        return zone, tracker, scale, last_sync


class _Api:
    """GET one Fitbit path for one patient: tokens, rate limit, retries."""

    def __init__(
        self, connector: FitbitConnector, oauth: FitbitOAuth, http: httpx.Client, patient: str
    ) -> None:
        self.c = connector
        self.oauth = oauth
        self.http = http
        self.patient = patient
        self.remaining: int | None = None
        self.reset_at: float | None = None
        self._tokens: Tokens | None = None

    def tokens(self) -> Tokens:
        """The patient's tokens, read once and refreshed when they expire."""
        if self._tokens is None or self._tokens.expired(self.c._clock()):
            self._tokens = self.oauth.current(self.patient)
        return self._tokens

    def get(self, path: str) -> Any:
        """The JSON body: an object, or a list (SpO2 over a range of days)."""
        body = self._get(path)
        if not isinstance(body, dict | list):
            raise SourceError(self.c.name, f"GET {path} did not answer with a JSON object")
        return body

    def get_list(self, path: str) -> list[dict[str, Any]]:
        body = self._get(path)
        return [d for d in body if isinstance(d, dict)] if isinstance(body, list) else []

    def _get(self, path: str) -> Any:
        url = f"{self.c.source.api_url}{path}"
        stale: Tokens | None = None
        refreshed = False
        for attempt in self.c.retrying.attempts("GET", url):
            if stale is not None:  # outside the attempt: a failed refresh is not a failed GET
                self._tokens, stale = self.oauth.refresh(self.patient, stale), None
            with attempt:
                self._wait_for_budget()
                tokens = self.tokens()
                response = self.http.get(url, headers={"Authorization": f"Bearer {tokens.access_token}"})
                self._note_budget(response)
                status = response.status_code
                if status == 401 and not refreshed and error_type(json_object(response)) in REFRESHABLE:
                    self.c.stats["token_refreshes"] += 1
                    stale, refreshed = tokens, True
                    attempt.repeat()
                if status == 429:
                    self._rate_limited(response, attempt)
                attempt.check(response, RETRY_STATUS)
                if response.is_success:
                    try:
                        return orjson.loads(response.content)
                    except orjson.JSONDecodeError:
                        raise SourceError(self.c.name, f"GET {path} did not answer with JSON") from None
                self._fail(response, path)
        raise AssertionError("unreachable: the last attempt raises")

    def _rate_limited(self, response: httpx.Response, attempt: Attempt) -> None:
        """Wait out a 429 (as Retry-After or the rate-limit reset says), or leave the patient for
        the next sync when that is longer than `max_wait_seconds`."""
        self.c.stats["rate_limited"] += 1
        wait = retry_after(response)
        if wait is None and self.reset_at is not None:
            wait = max(0.0, self.reset_at - time.monotonic())
        if wait is not None and wait > self.c.source.max_wait_seconds:
            raise _Deferred(wait)
        self.remaining = None
        attempt.check(response, frozenset({429}), wait=wait)

    def _fail(self, response: httpx.Response, path: str) -> None:
        status = response.status_code
        kind = error_type(json_object(response)) or response.reason_phrase
        if status == 401:
            raise PatientAuthError(
                self.c.name,
                self.patient,
                f"Fitbit refuses the patient's access token ({kind}); they may have revoked access: "
                + reconnect(self.c.name, self.patient),
            )
        if status == 403:
            intraday = "/1d/1min" in path or path.endswith("/all.json")
            why = (
                "Fitbit gives this application no intraday data: set intraday = false"
                if intraday
                else "the patient's grant lacks the scope for it"
            )
            raise PatientAuthError(self.c.name, self.patient, f"GET {path} answered 403 ({kind}): {why}")
        raise SourceError(self.c.name, f"GET {path} answered {status}: {_explain(response)}; check api_url")

    def _note_budget(self, response: httpx.Response) -> None:
        """What the `fitbit-rate-limit-*` headers say is left of this hour's requests."""
        remaining = response.headers.get("fitbit-rate-limit-remaining")
        reset = response.headers.get("fitbit-rate-limit-reset")
        try:
            self.remaining = int(remaining) if remaining is not None else None
            self.reset_at = time.monotonic() + float(reset) if reset is not None else None
        except ValueError:
            self.remaining = self.reset_at = None

    def _wait_for_budget(self) -> None:
        if self.remaining is None or self.remaining > 0 or self.reset_at is None:
            return
        wait = max(0.0, self.reset_at - time.monotonic()) + 1.0
        if wait > self.c.source.max_wait_seconds:
            raise _Deferred(wait)
        self.c.stats["rate_limit_waits"] += 1
        log.info("%s: patient %s used this hour's requests; waiting %.0f s", self.c.name, self.patient, wait)
        self.c._sleep(wait)
        self.remaining = None


def _explain(response: httpx.Response) -> str:
    """What Fitbit said went wrong: its error message, without anything that looks like a token
    (some quote them), else its error type."""
    body = json_object(response)
    return _redacted(_message(body)) or error_type(body) or response.reason_phrase


def _message(body: dict[str, Any]) -> str:
    errors = body.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return str(errors[0].get("message", ""))
    return ""


def _redacted(text: str) -> str:
    """A Fitbit error message without anything that looks like a token (some quote them)."""
    return LONG_TOKEN.sub("…", text)[:200]


def describe(watermark: Watermark) -> str:
    """How far the patients' data got: each patient is complete through the earliest of their
    days known complete (one per kind of data), the source through its slowest patient's."""
    patients: dict[str, dict[str, str]] = watermark.get("patients", {})
    if not patients:
        return "no patient pulled yet"
    n, through = len(patients), sorted(min(marks.values()) for marks in patients.values() if marks)
    who = f"{n} patient{'s' * (n != 1)}"
    if not through:
        return f"{who}, no day complete yet"
    span = f"through {through[0]}" + (
        f" (the furthest through {through[-1]})" if through[-1] > through[0] else ""
    )
    if len(through) == n:
        return f"{who}, {'all ' * (n > 1)}complete {span}"
    return f"{who}: {len(through)} complete {span}, {n - len(through)} with no day complete yet"


KIND = SourceKind(
    kind="fitbit",
    modality="wearables",
    summary="The Fitbit Web API, per connected patient (OAuth 2.0 with PKCE), intraday where granted",
    config=FitbitSource,
    build=lambda source, context: FitbitConnector(
        source, TokenStore.for_source(source, source.token_path(context.store))
    ),
    records="samples",
    describe=describe,
    account=FitbitAccount.for_source,
)
