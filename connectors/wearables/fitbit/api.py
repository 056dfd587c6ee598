"""Fitbit Web API: every connected patient's heart rate, steps, sleep, SpO2 and weight, as
wearable samples (SAMPLE_SCHEMA, in the units Fitbit sends).

Patients are connected one by one (`twinhub wearables connect`, see `connectors.wearables.fitbit.oauth`);
a pull walks each connected patient by date windows from their own watermark: per kind of data,
the last local day known complete (before today in the patient's time zone, and before the day
their tracker last synced). The next sync asks again from `overlap_days` before that, since a
tracker can sync late; samples seen twice land once (the store deduplicates them).

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
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import orjson
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from connectors.base import RECORD_SCHEMA, SAMPLE_SCHEMA, Batch, Watermark, Window, problems_from
from connectors.errors import SourceError, TransientError, safe_url
from connectors.fhir.auth import json_object, refuse_inline_secrets
from connectors.fhir.client import retry_after
from connectors.wearables.fitbit.oauth import (
    FitbitOAuth,
    PatientAuthError,
    Tokens,
    TokenStore,
    error_type,
    reconnect,
)

log = logging.getLogger(__name__)

Data = Literal["heart_rate", "steps", "sleep", "spo2", "weight"]
ALL_DATA: tuple[Data, ...] = ("heart_rate", "steps", "sleep", "spo2", "weight")
SCOPE: dict[Data, str] = {
    "heart_rate": "heartrate",
    "steps": "activity",
    "sleep": "sleep",
    "spo2": "oxygen_saturation",
    "weight": "weight",
}
Scope = Literal[
    "activity", "heartrate", "location", "nutrition", "oxygen_saturation", "profile",
    "respiratory_rate", "settings", "sleep", "social", "temperature", "weight",
]  # fmt: skip
DEFAULT_SCOPES: tuple[Scope, ...] = (
    "activity", "heartrate", "sleep", "weight", "oxygen_saturation", "profile", "settings"
)  # fmt: skip
"""The data's scopes, and the patient's time zone (profile) and devices (settings): without
those two, `timezone` and device "Fitbit" stand in."""
RANGE_DAYS: dict[str, int] = {"heart_rate": 365, "steps": 1095, "sleep": 100, "spo2": 30, "weight": 31}
"""The longest date range Fitbit answers per request, for the kinds asked for by range."""
SLEEP_LEVEL = {
    "asleep": "sleep_asleep",
    "restless": "sleep_awake",  # classic logs count restless minutes as awake (minutesAwake)
    "awake": "sleep_awake",
    "wake": "sleep_awake",
    "deep": "sleep_deep",
    "light": "sleep_light",
    "rem": "sleep_rem",
}
REFRESHABLE = ("expired_token", "invalid_token", None)
"""A 401 of these kinds (None: no body) gets one refresh and a retry."""
SECRETS = ("client_secret", "token_key", "access_token", "refresh_token", "token")
LONG_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{24,}")
DAY = timedelta(days=1)
MINUTE = timedelta(minutes=1)


class FitbitSource(BaseModel):
    """Config of a `fitbit` source."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["fitbit"]
    client_id: str
    redirect_uri: str
    """Exactly as registered with the application at Fitbit."""
    client_secret_file: Path | None = None
    """Server apps authenticate with a client secret (HTTP Basic); client and personal apps use
    PKCE alone and send client_id in the body: set neither."""
    client_secret_env: str | None = None
    scopes: list[Scope] = Field(default_factory=lambda: list(DEFAULT_SCOPES))
    """What a connection asks for; the data pulled is what these (and the patient) allow."""
    since: date | None = None
    """The first day pulled for a newly connected patient (default: 30 days before today)."""
    intraday: bool = True
    """Per-minute heart rate, steps and SpO2 (Fitbit grants intraday data to personal apps and
    to apps it approved); false: daily steps, resting heart rate and nightly SpO2, by range."""
    overlap_days: int = Field(default=1, ge=0, le=30)
    timezone: str = "UTC"
    """For patients who did not share their profile (its time zone places their local times)."""
    token_file: Path | None = None
    """The encrypted tokens (default: secrets/<source name>.tokens in the store folder)."""
    token_key_env: str | None = None
    """The key that encrypts them; else `token_key_file`, else `<token file>.key`, made on first use."""
    token_key_file: Path | None = None
    max_wait_seconds: float = Field(default=60, ge=0)
    """Wait this long at most for the rate limit; a longer wait leaves the patient for next time."""
    batch_samples: int = Field(default=200_000, ge=1, le=500_000)
    api_url: str = "https://api.fitbit.com"
    authorize_url: str = "https://www.fitbit.com/oauth2/authorize"
    token_url: str = "https://api.fitbit.com/oauth2/token"
    schedule: str | None = None
    timeout_seconds: float = Field(default=60, gt=0)
    retries: int = Field(default=5, ge=0, le=20)
    backoff_seconds: float = Field(default=1.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        return refuse_inline_secrets(data, SECRETS)

    @model_validator(mode="after")
    def _check(self) -> FitbitSource:
        if not any(SCOPE[d] in self.scopes for d in ALL_DATA):
            wanted = ", ".join(sorted(SCOPE.values()))
            raise ValueError(f"scopes allow no data to pull; add at least one of {wanted}")
        for what in ("client_secret", "token_key"):
            if getattr(self, f"{what}_file") is not None and getattr(self, f"{what}_env") is not None:
                raise ValueError(f"set at most one of {what}_file or {what}_env")
        return self

    @field_validator("api_url", "authorize_url", "token_url", "redirect_uri")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{url!r} is not an http(s) URL")
        return url.rstrip("/") if parts.path in ("", "/") else url

    @field_validator("timezone")
    @classmethod
    def _check_zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {name!r} is not an IANA time zone, e.g. 'Europe/Berlin'") from None
        return name

    def token_path(self, store: Path) -> Path:
        """Where the encrypted tokens live, given the store folder."""
        return self.token_file or store / "secrets" / f"{self.name}.tokens"

    def data(self) -> list[Data]:
        """The kinds of data the configured scopes allow, in pull order."""
        return [d for d in ALL_DATA if SCOPE[d] in self.scopes]


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
            ctx = _Context(patient, zone, scale if data == "weight" else tracker)
            yield from self._pull_data(api, ctx, data, first, last, complete, mine, marks, window)

    def _pull_data(
        self,
        api: _Api,
        ctx: _Context,
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
        samples = _Samples()
        moved = False
        start = first
        while start <= last:
            end = min(start + (span - 1) * DAY, last)
            path = _path(data, intraday, start, end)
            try:
                body = api.get(path)
            except (_Deferred, PatientAuthError, TransientError):
                if moved or samples:  # what came before lands, with its watermark
                    yield self._batch(samples, marks)
                raise
            if not isinstance(body, dict) and data != "spo2":
                raise SourceError(self.name, f"GET {path} did not answer with a JSON object")
            _MAP[data, intraday](samples, ctx, body, path)
            self.stats[f"{data}_requests"] += 1
            done = min(end, complete)
            if window is None and done.isoformat() > mine.get(data, ""):
                mine[data] = done.isoformat()
                moved = True
            if len(samples) >= self.source.batch_samples:
                yield self._batch(samples, marks)
                samples, moved = _Samples(), False
            start = end + DAY
        if moved or samples:
            yield self._batch(samples, marks)

    def _batch(self, samples: _Samples, marks: dict[str, dict[str, str]]) -> Batch:
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
                synced = _local(str(device.get("lastSyncTime", "")))
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
        source = self.c.source
        url = f"{source.api_url}{path}"
        tokens = self.tokens()
        refreshed = False
        failures = 0
        while True:
            self._wait_for_budget()
            try:
                response = self.http.get(url, headers={"Authorization": f"Bearer {tokens.access_token}"})
            except httpx.TransportError as e:
                self._retry(failures, f"failed ({type(e).__name__})", None, url)
                failures += 1
                continue
            self._note_budget(response)
            status = response.status_code
            if status == 401 and not refreshed and error_type(json_object(response)) in REFRESHABLE:
                self.c.stats["token_refreshes"] += 1
                tokens = self._tokens = self.oauth.refresh(self.patient, tokens)
                refreshed = True
                continue
            if status == 429:
                self.c.stats["rate_limited"] += 1
                wait = retry_after(response)
                if wait is None and self.reset_at is not None:
                    wait = max(0.0, self.reset_at - time.monotonic())
                if wait is not None and wait > source.max_wait_seconds:
                    raise _Deferred(wait)
                self._retry(failures, "answered 429 Too Many Requests", wait, url)
                failures += 1
                self.remaining = None
                continue
            if status in (408, 500, 502, 503, 504):
                self._retry(failures, f"answered {status}", retry_after(response), url)
                failures += 1
                continue
            if response.is_success:
                try:
                    return orjson.loads(response.content)
                except orjson.JSONDecodeError:
                    raise SourceError(self.c.name, f"GET {path} did not answer with JSON") from None
            self._fail(response, path)

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
            why = "Fitbit gives this application no intraday data: set intraday = false" if intraday else (
                "the patient's grant lacks the scope for it"
            )  # fmt: skip
            raise PatientAuthError(self.c.name, self.patient, f"GET {path} answered 403 ({kind}): {why}")
        detail = _redacted(_message(json_object(response))) or kind
        raise SourceError(self.c.name, f"GET {path} answered {status}: {detail}; check api_url")

    def _retry(self, failures: int, what: str, wait: float | None, url: str) -> None:
        source = self.c.source
        if failures >= source.retries:
            raise TransientError(
                f"source {self.c.name!r}: GET {safe_url(url)} gave up after {failures} retries; "
                f"the last {what}"
            )
        if wait is None:
            wait = random.uniform(0, min(60.0, source.backoff_seconds * 2**failures))
        self.c.stats["retries"] += 1
        log.warning(
            "%s: GET %s %s; retry %d of %d in %.1f s",
            self.c.name,
            safe_url(url),
            what,
            failures + 1,
            source.retries,
            wait,
        )
        self.c._sleep(wait)

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


class _Context:
    __slots__ = ("device", "patient", "zone")

    def __init__(self, patient: str, zone: ZoneInfo, device: str) -> None:
        self.patient = patient
        self.zone = zone
        self.device = device


class _Samples:
    """Samples gathered column by column; local times are placed in the patient's zone here."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {name: [] for name in SAMPLE_SCHEMA.names}
        self.reported: dict[str, list[Any]] = {name: [] for name in SAMPLE_SCHEMA.names}
        """Fitbit's own totals of days whose intraday samples land (see `Batch.reported`)."""
        self.problems: list[tuple[str, int, str, str]] = []
        self.stats: Counter[str] = Counter()

    def problem(self, origin: str, reason: str, raw: object) -> None:
        """What Fitbit sent that cannot become a sample: quarantined with the reason."""
        self.problems.append((origin, 0, reason, orjson.dumps(raw).decode()))

    def __len__(self) -> int:
        return len(self.cols["value"])

    def __bool__(self) -> bool:
        return bool(self.cols["value"] or self.reported["value"] or self.problems or self.stats)

    def add(
        self,
        ctx: _Context,
        metric: str,
        start: datetime,
        end: datetime | None,
        value: float,
        unit: str,
        origin: str,
        device: str | None = None,
        *,
        reported: bool = False,
    ) -> None:
        """`start` and `end` are the patient's local clock times (naive), as Fitbit sends them."""
        aware = start.replace(tzinfo=ctx.zone)
        offset = aware.utcoffset() or timedelta()
        c = self.reported if reported else self.cols
        c["patient_id"].append(ctx.patient)
        c["device"].append(device or ctx.device)
        c["metric"].append(metric)
        c["start_time"].append((start - offset).replace(tzinfo=UTC))
        if end is not None:
            end = (end - (end.replace(tzinfo=ctx.zone).utcoffset() or timedelta())).replace(tzinfo=UTC)
        c["end_time"].append(end)
        c["utc_offset_minutes"].append(int(offset.total_seconds() // 60))
        c["value"].append(float(value))
        c["unit"].append(unit)
        c["origin"].append(origin)

    def table(self, *, reported: bool = False) -> pa.Table:
        cols = self.reported if reported else self.cols
        return pa.table(
            {name: pa.array(col, SAMPLE_SCHEMA.field(name).type) for name, col in cols.items()},
            schema=SAMPLE_SCHEMA,
        )


def _path(data: Data, intraday: bool, start: date, end: date) -> str:
    if data == "heart_rate":
        return (
            f"/1/user/-/activities/heart/date/{start}/1d/1min.json"
            if intraday
            else f"/1/user/-/activities/heart/date/{start}/{end}.json"
        )
    if data == "steps":
        return (
            f"/1/user/-/activities/steps/date/{start}/1d/1min.json"
            if intraday
            else f"/1/user/-/activities/steps/date/{start}/{end}.json"
        )
    if data == "spo2":
        return (
            f"/1/user/-/spo2/date/{start}/all.json" if intraday else f"/1/user/-/spo2/date/{start}/{end}.json"
        )
    if data == "sleep":
        return f"/1.2/user/-/sleep/date/{start}/{end}.json"
    return f"/1/user/-/body/log/weight/date/{start}/{end}.json"


def _heart_intraday(samples: _Samples, ctx: _Context, body: dict[str, Any], origin: str) -> None:
    _resting(samples, ctx, body, origin)
    for start, value in _intraday(samples, body, "activities-heart", origin):
        samples.add(ctx, "heart_rate", start, start + MINUTE, value, "bpm", origin)


def _resting(samples: _Samples, ctx: _Context, body: dict[str, Any], origin: str) -> None:
    """The day's resting heart rate. The 2015-era API sent a plain number as `value` instead, of
    unstated meaning: that is counted in the stats, not landed."""
    for entry in body.get("activities-heart", []):
        value = entry.get("value")
        day = _day(entry.get("dateTime"))
        if isinstance(value, dict) and "restingHeartRate" in value:
            rate = _number(value["restingHeartRate"])
            if day is None or rate is None:
                samples.problem(origin, "a resting heart rate without a date or a number", entry)
                continue
            midnight = datetime.combine(day, datetime.min.time())
            samples.add(ctx, "resting_heart_rate", midnight, midnight + DAY, rate, "bpm", origin)
        elif not isinstance(value, dict):
            samples.stats["heart_rate_daily_values_skipped"] += 1


def _steps_intraday(samples: _Samples, ctx: _Context, body: dict[str, Any], origin: str) -> None:
    """Steps per minute, and the day's total as Fitbit's reported figure (it may count steps
    the minutes miss). A day whose dataset is empty while its total is not (an app without
    intraday access gets only the total) lands the total as one day-long sample, so steps are
    never counted twice and never lost."""
    before = len(samples)
    for start, value in _intraday(samples, body, "activities-steps", origin):
        samples.add(ctx, "steps", start, start + MINUTE, value, "steps", origin)
    if len(samples) == before:
        _steps_daily(samples, ctx, body, origin, only_positive=True)
    else:
        _steps_daily(samples, ctx, body, origin, reported=True)


def _steps_daily(
    samples: _Samples, ctx: _Context, body: dict[str, Any], origin: str, *, only_positive: bool = False,
    reported: bool = False,
) -> None:  # fmt: skip
    for entry in body.get("activities-steps", []):
        day, value = _day(entry.get("dateTime")), _number(entry.get("value"))
        if day is None or value is None:
            samples.problem(origin, "a daily step count without a date or a number", entry)
        elif value > 0 or not only_positive:
            midnight = datetime.combine(day, datetime.min.time())
            samples.add(ctx, "steps", midnight, midnight + DAY, value, "steps", origin, reported=reported)


def _intraday(
    samples: _Samples, body: dict[str, Any], key: str, origin: str
) -> Iterator[tuple[datetime, float]]:
    """(local start, value) of each point of an intraday dataset; its day is the summary's dateTime."""
    summary = body.get(key) or [{}]
    day = _day(summary[0].get("dateTime"))
    dataset = (body.get(f"{key}-intraday") or {}).get("dataset") or []
    if day is None:
        if dataset:
            samples.problem(origin, f"an intraday dataset whose {key} summary has no date", summary[0])
        return
    for point in dataset:
        value = _number(point.get("value"))
        try:
            clock = datetime.strptime(str(point.get("time")), "%H:%M:%S").time()
        except ValueError:
            samples.problem(origin, "an intraday point whose time is not HH:MM:SS", point)
            continue
        if value is None:
            samples.problem(origin, "an intraday point whose value is not a number", point)
            continue
        yield datetime.combine(day, clock), value


def _sleep(samples: _Samples, ctx: _Context, body: dict[str, Any], origin: str) -> None:
    """Each sleep log's stages (classic or stages levels) as samples of their length, and its
    time in bed."""
    for log_ in body.get("sleep", []):
        start, end = _local(log_.get("startTime")), _local(log_.get("endTime"))
        for segment in (log_.get("levels") or {}).get("data", []):
            begins, seconds = _local(segment.get("dateTime")), _number(segment.get("seconds"))
            metric = SLEEP_LEVEL.get(str(segment.get("level")))
            if begins is None or seconds is None or metric is None:
                why = "an unknown sleep level" if metric is None else "a sleep stage without a time or length"
                samples.problem(origin, f"{why} in sleep log {log_.get('logId')}", segment)
                continue
            samples.add(ctx, metric, begins, begins + timedelta(seconds=seconds), seconds, "s", origin)
        in_bed = _number(log_.get("timeInBed"))
        if start is None or in_bed is None:
            samples.problem(origin, "a sleep log without a start time or time in bed", _summary(log_))
        else:
            samples.add(ctx, "time_in_bed", start, end, in_bed, "min", origin)


def _spo2_intraday(samples: _Samples, ctx: _Context, body: Any, origin: str) -> None:
    for entry in body if isinstance(body, list) else [body]:
        for point in entry.get("minutes", []):
            start, value = _local(point.get("minute")), _number(point.get("value"))
            if start is None or value is None:
                samples.problem(origin, "an SpO2 minute without a time or a number", point)
            else:
                samples.add(ctx, "oxygen_saturation", start, start + MINUTE, value, "%", origin)


def _spo2_daily(samples: _Samples, ctx: _Context, body: Any, origin: str) -> None:
    """A night's mean SpO2, dated by Fitbit to the day the night ends, spans that day."""
    for entry in body if isinstance(body, list) else [body]:
        day, value = _day(entry.get("dateTime")), entry.get("value")
        mean = _number(value.get("avg")) if isinstance(value, dict) else None
        if day is None or mean is None:
            samples.problem(origin, "a nightly SpO2 without a date or an average", entry)
            continue
        midnight = datetime.combine(day, datetime.min.time())
        samples.add(ctx, "oxygen_saturation", midnight, midnight + DAY, mean, "%", origin)


def _weight(samples: _Samples, ctx: _Context, body: dict[str, Any], origin: str) -> None:
    """Weight logs (kg: no Accept-Language header asks for Fitbit's metric units), with BMI and
    body fat when sent."""
    for entry in body.get("weight", []):
        when = _local(f"{entry.get('date')}T{entry.get('time', '00:00:00')}")
        if when is None:
            samples.problem(origin, "a weight log without a date and time", entry)
            continue
        via = entry.get("source")
        device = None
        if isinstance(via, str):
            device = f"Fitbit {via}" if via.lower().startswith("aria") else f"Fitbit ({via} entry)"
        for key, metric, unit in (("weight", "body_weight", "kg"), ("bmi", "body_mass_index", "kg/m2"),
                                  ("fat", "body_fat_percentage", "%")):  # fmt: skip
            if key not in entry:
                continue
            value = _number(entry[key])
            if value is None:
                samples.problem(origin, f"a weight log whose {key} is not a number", entry)
            else:
                samples.add(ctx, metric, when, None, value, unit, origin, device)


def _summary(log_: dict[str, Any]) -> dict[str, Any]:
    """A sleep log without its (long) levels, for a problem's raw text."""
    return {k: v for k, v in log_.items() if k != "levels"}


_MAP: dict[tuple[Data, bool], Callable[[_Samples, _Context, Any, str], None]] = {
    ("heart_rate", True): _heart_intraday,
    ("heart_rate", False): _resting,
    ("steps", True): _steps_intraday,
    ("steps", False): _steps_daily,
    ("spo2", True): _spo2_intraday,
    ("spo2", False): _spo2_daily,
    ("sleep", False): _sleep,
    ("weight", False): _weight,
}


def _day(value: object) -> date | None:
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        return None


def _local(value: object) -> datetime | None:
    """A Fitbit local time ('2016-12-13T09:59:00.000'), naive."""
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed.replace(tzinfo=None)


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _message(body: dict[str, Any]) -> str:
    errors = body.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return str(errors[0].get("message", ""))
    return ""


def _redacted(text: str) -> str:
    """A Fitbit error message without anything that looks like a token (some quote them)."""
    return LONG_TOKEN.sub("…", text)[:200]
