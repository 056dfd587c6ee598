"""A stand-in for the Fitbit Web API on 127.0.0.1 (there is no Fitbit server here).

It serves either the recorded real Fitbit responses in
../shared/data/wearables/device-api-responses/fitbit/ (`recorded=True`, read in place) or small
bodies of its own in the shape the Fitbit Web API documents (`OWN`, for a fresh clone without
../shared), under the same names, for the days they hold (intraday heart rate and steps of
2015-08-21, daily steps of 2015-08-23..25, the sleep of 2016-12-13, weight logs of 2015-05);
ranges get the entries that fall in them, daily steps a "0" for every other day (as Fitbit
answers), and other intraday days an empty dataset. SpO2, profile and devices were never
recorded: those bodies are always made here.

OAuth runs as Fitbit runs it: the authorization code grant with PKCE (S256), 8-hour access tokens,
single-use refresh tokens (a used one presented again within `grace_seconds` gets the same new
pair, later `invalid_grant`), client_id in the body or HTTP Basic, errors in Fitbit's shape that
quote the token. Every API answer carries `fitbit-rate-limit-limit/-remaining/-reset`; a user's
spent hourly budget gets 429 with `Retry-After`, and so does a request while `fail_next_429` lasts.

Tests drive it through `FitbitServer`: who signs in at the consent page (`authorize`), forced
token expiry (`expire_access_tokens`), and what it saw (`requests`, `statuses`).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import orjson
import pytest

from tests.support.data import SHARED

RECORDED = SHARED / "wearables" / "device-api-responses" / "fitbit"
CLIENT_ID = "23TWIN"

# SpO2 of the night that ends 2016-12-13 (the recorded sleep's night), in the shape of
# GET /1/user/-/spo2/date/[date]/all.json and .../[start]/[end].json.
SPO2_DAY = "2016-12-13"
SPO2_MINUTES = [
    {"value": 95.7, "minute": "2016-12-13T01:20:00"},
    {"value": 96.1, "minute": "2016-12-13T01:21:00"},
    {"value": 94.8, "minute": "2016-12-13T01:22:00"},
    {"value": 97.0, "minute": "2016-12-13T01:23:00"},
]
SPO2_SUMMARY = {"avg": 95.9, "min": 94.8, "max": 97.0}


OWN: dict[str, Any] = {
    "fitbit-activities-heart-1d-1m-intraday.json": {
        "activities-heart": [
            {
                "dateTime": "2015-08-21",
                "value": {"customHeartRateZones": [], "heartRateZones": [], "restingHeartRate": 58},
            }
        ],
        "activities-heart-intraday": {
            "dataset": [{"time": f"00:0{m}:00", "value": 60 + m % 3} for m in range(6)],
            "datasetInterval": 1,
            "datasetType": "minute",
        },
    },
    "fitbit-activities-steps-1d-1m-intraday.json": {
        "activities-steps": [{"dateTime": "2015-08-21", "value": "40"}],
        "activities-steps-intraday": {
            "dataset": [{"time": f"08:1{m}:00", "value": v} for m, v in enumerate([0, 12, 28, 0])],
            "datasetInterval": 1,
            "datasetType": "minute",
        },
    },
    "fitbit-activities-steps-timeseries.json": {
        "activities-steps": [
            {"dateTime": "2015-08-23", "value": "1200"},
            {"dateTime": "2015-08-24", "value": "800"},
            {"dateTime": "2015-08-25", "value": "0"},
        ]
    },
    "fitbit-sleep-date-range.json": {
        "sleep": [
            {
                "dateOfSleep": "2016-12-13",
                "duration": 4920000,
                "endTime": "2016-12-13T00:52:00.000",
                "isMainSleep": True,
                "levels": {
                    "data": [
                        {"dateTime": "2016-12-12T23:30:00.000", "level": "wake", "seconds": 300},
                        {"dateTime": "2016-12-12T23:35:00.000", "level": "light", "seconds": 1800},
                        {"dateTime": "2016-12-13T00:05:00.000", "level": "deep", "seconds": 1200},
                        {"dateTime": "2016-12-13T00:25:00.000", "level": "rem", "seconds": 900},
                        {"dateTime": "2016-12-13T00:40:00.000", "level": "light", "seconds": 600},
                        {"dateTime": "2016-12-13T00:50:00.000", "level": "wake", "seconds": 120},
                    ],
                    "shortData": [{"dateTime": "2016-12-12T23:50:00.000", "level": "wake", "seconds": 60}],
                },
                "logId": 26013218219,
                "minutesAsleep": 75,
                "minutesAwake": 7,
                "startTime": "2016-12-12T23:30:00.000",
                "timeInBed": 82,
                "type": "stages",
            }
        ]
    },
    "fitbit-body-log-weight.json": {
        "weight": [
            {
                "bmi": 22.1,
                "date": "2015-05-13",
                "fat": 18.5,
                "logId": 1,
                "source": "Aria",
                "time": "08:00:00",
                "weight": 70.5,
            },
            {
                "bmi": 22.0,
                "date": "2015-05-20",
                "logId": 2,
                "source": "Web",
                "time": "07:30:00",
                "weight": 70.1,
            },
        ]
    },
}
"""Bodies of our own, named as the recordings they stand in for (stages sleep, resting heart
rate, body fat and a weight source, which the recordings lack)."""


@dataclass
class User:
    user_id: str
    timezone: str = "America/Los_Angeles"
    last_sync: str = "2016-12-14T08:00:00.000"
    device: str = "Charge HR"


@dataclass
class Grant:
    user_id: str
    scope: str
    access_token: str
    refresh_token: str
    expires_at: float


@dataclass
class FitbitState:
    """Everything the server knows; tests change it between requests."""

    users: dict[str, User] = field(default_factory=dict)
    login_as: str = "USER1"
    granted_scopes: str | None = None
    """The scopes the patient ticks at the consent page (None: all asked for)."""
    codes: dict[str, tuple[str, str, str, str]] = field(default_factory=dict)
    grants: dict[str, Grant] = field(default_factory=dict)
    """Live access token -> grant."""
    refresh: dict[str, Grant] = field(default_factory=dict)
    """Live refresh token -> grant."""
    used_refresh: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    """A used refresh token -> when, and the answer it got (given again within the grace)."""
    grace_seconds: float = 120.0
    access_seconds: int = 28800
    hourly_limit: int = 150
    reset_seconds: int = 1800
    spent: Counter[str] = field(default_factory=Counter)
    intraday_allowed: bool = True
    """False: intraday paths answer 403, as for an application without intraday access."""
    fail_next_429: int = 0
    retry_after: str = "2"
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    """(method, path, Fitbit user or '') of every request."""
    basic_auth: list[str] = field(default_factory=list)
    """The decoded HTTP Basic credentials of each token request that sent them."""
    form_client_ids: list[str | None] = field(default_factory=list)
    """The client_id in the body of each token request (None: not sent)."""
    statuses: Counter[int] = field(default_factory=Counter)
    """How often each status was answered."""
    lock: threading.Lock = field(default_factory=threading.Lock)


class FitbitServer:
    def __init__(self, *, recorded: bool = False) -> None:
        self.bodies: dict[str, Any] = {name: _recorded_or_own(name, recorded) for name in OWN}
        self.state = FitbitState()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._http.daemon_threads = True
        self._http.state = self.state  # type: ignore[attr-defined]
        self._http.bodies = self.bodies  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(
            target=self._http.serve_forever, args=(0.05,), daemon=True, name="fitbit-server"
        )  # a short poll: shutdown() waits for it
        self._thread.start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def authorize(self, url: str, user: str = "USER1", scopes: str | None = None) -> str:
        """The patient opens the authorization URL and allows access: the redirect address."""
        self.state.users.setdefault(user, User(user))
        self.state.login_as, self.state.granted_scopes = user, scopes
        response = httpx.get(url, follow_redirects=False)
        assert response.status_code == 302, response.text
        return response.headers["location"]

    def expire_access_tokens(self) -> None:
        """Every access token expires now (as 8 hours passing would do)."""
        with self.state.lock:
            for grant in self.state.grants.values():
                grant.expires_at = 0.0

    def api_requests(self, user: str | None = None) -> list[str]:
        return [p for m, p, u in self.state.requests if p.startswith("/1") and (user is None or u == user)]

    def token_posts(self) -> int:
        return sum(1 for m, p, u in self.state.requests if p == "/oauth2/token")

    def issued_tokens(self) -> set[str]:
        """Every token the server ever issued or was shown."""
        st = self.state
        return (
            set(st.grants)
            | set(st.refresh)
            | set(st.used_refresh)
            | {a[k] for _, a in st.used_refresh.values() for k in ("access_token", "refresh_token")}
        )


@contextlib.contextmanager
def serve(*, recorded: bool = False) -> Iterator[FitbitServer]:
    """A running stand-in; with `recorded`, the test is skipped where ../shared is absent."""
    if recorded and not RECORDED.is_dir():
        pytest.skip(f"recorded Fitbit responses not found at {RECORDED} (../shared/data is absent)")
    server = FitbitServer(recorded=recorded)
    try:
        yield server
    finally:
        server.close()


def _recorded_or_own(name: str, recorded: bool) -> Any:
    return orjson.loads((RECORDED / name).read_bytes()) if recorded else copy.deepcopy(OWN[name])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else each answer waits ~40 ms for a delayed ACK

    @property
    def st(self) -> FitbitState:
        return self.server.state  # type: ignore[attr-defined,no-any-return]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/oauth2/authorize":
            self._authorize(parse_qs(parts.query))
            return
        self._api(parts.path)

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        if urlsplit(self.path).path != "/oauth2/token":
            self._send(404, {"errors": [{"errorType": "not_found", "message": "no such path"}]})
            return
        basic = self.headers.get("authorization", "")
        with self.st.lock:
            self.st.requests.append(("POST", "/oauth2/token", ""))
            if basic.startswith("Basic "):
                self.st.basic_auth.append(base64.b64decode(basic.removeprefix("Basic ")).decode())
            self.st.form_client_ids.append(form.get("client_id"))
            status, body = self._token(form)
        self._send(status, body)

    # OAuth

    def _authorize(self, q: dict[str, list[str]]) -> None:
        get = {k: v[0] for k, v in q.items()}
        if get.get("client_id") != CLIENT_ID or get.get("response_type") != "code":
            self._send(
                400, {"errors": [{"errorType": "invalid_request", "message": "bad authorize request"}]}
            )
            return
        if get.get("code_challenge_method") != "S256" or len(get.get("code_challenge", "")) != 43:
            self._send(400, {"errors": [{"errorType": "invalid_request", "message": "PKCE S256 required"}]})
            return
        code = secrets.token_hex(20)
        scope = self.st.granted_scopes if self.st.granted_scopes is not None else get.get("scope", "")
        with self.st.lock:
            self.st.codes[code] = (self.st.login_as, get["code_challenge"], get["redirect_uri"], scope)
        query = urlencode({"code": code, "state": get.get("state", "")})
        self.send_response(302)
        self.send_header("Location", f"{get['redirect_uri']}?{query}#_=_")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("client_id") != CLIENT_ID and not self.headers.get("authorization", "").startswith(
            "Basic"
        ):
            return 401, _error("invalid_client", "Invalid client_id")
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            found = self.st.codes.pop(form.get("code", ""), None)
            if found is None:
                return 400, _error("invalid_grant", f"Authorization code invalid: {form.get('code')}")
            user, challenge, redirect_uri, scope = found
            verifier = form.get("code_verifier", "").encode()
            made = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode()
            if made != challenge:
                return 400, _error("invalid_grant", "Invalid code_verifier")
            if form.get("redirect_uri") != redirect_uri:
                return 400, _error("invalid_grant", "Redirect_uri mismatch")
            return 200, self._issue(user, scope)
        if grant_type == "refresh_token":
            token = form.get("refresh_token", "")
            if token in self.st.used_refresh:
                used_at, answer = self.st.used_refresh[token]
                if time.time() - used_at <= self.st.grace_seconds:
                    return 200, answer
                return 400, _error("invalid_grant", f"Refresh token invalid: {token}")
            grant = self.st.refresh.pop(token, None)
            if grant is None:
                return 400, _error("invalid_grant", f"Refresh token invalid: {token}")
            self.st.grants.pop(grant.access_token, None)
            answer = self._issue(grant.user_id, grant.scope)
            self.st.used_refresh[token] = (time.time(), answer)
            return 200, answer
        return 400, _error("unsupported_grant_type", f"{grant_type}")

    def _issue(self, user: str, scope: str) -> dict[str, Any]:
        grant = Grant(
            user, scope, secrets.token_hex(32), secrets.token_hex(32), time.time() + self.st.access_seconds
        )
        self.st.grants[grant.access_token] = grant
        self.st.refresh[grant.refresh_token] = grant
        return {
            "access_token": grant.access_token,
            "expires_in": self.st.access_seconds,
            "refresh_token": grant.refresh_token,
            "scope": scope,
            "token_type": "Bearer",
            "user_id": user,
        }

    # The Web API

    def _api(self, path: str) -> None:
        token = self.headers.get("authorization", "").removeprefix("Bearer ")
        with self.st.lock:
            grant = self.st.grants.get(token)
            self.st.requests.append(("GET", path, grant.user_id if grant else ""))
            if grant is None:
                self._send(401, _error("invalid_token", f"Access token invalid: {token}"))
                return
            if grant.expires_at <= time.time():
                self._send(401, _error("expired_token", f"Access token expired: {token}"))
                return
            user = grant.user_id
            if self.st.fail_next_429 > 0:
                self.st.fail_next_429 -= 1
                self._send(
                    429, _error("system", "Too Many Requests"), self._limits(user), self.st.retry_after
                )
                return
            if self.st.spent[user] >= self.st.hourly_limit:
                self._send(
                    429, _error("system", "Too Many Requests"), self._limits(user), str(self.st.reset_seconds)
                )
                return
            self.st.spent[user] += 1
            limits = self._limits(user)
            profile = self.st.users.setdefault(user, User(user))
        intraday = "/1d/1min" in path or path.endswith("/all.json")
        if intraday and not self.st.intraday_allowed:
            self._send(403, _error("insufficient_permissions", "Intraday data is not permitted"), limits)
            return
        body = _route(path, profile, self.server.bodies)  # type: ignore[attr-defined]
        if body is None:
            self._send(404, _error("not_found", "The API you are requesting could not be found."), limits)
        else:
            self._send(200, body, limits)

    def _limits(self, user: str) -> dict[str, str]:
        return {
            "fitbit-rate-limit-limit": str(self.st.hourly_limit),
            "fitbit-rate-limit-remaining": str(max(0, self.st.hourly_limit - self.st.spent[user])),
            "fitbit-rate-limit-reset": str(self.st.reset_seconds),
        }

    def _send(
        self, status: int, body: Any, headers: dict[str, str] | None = None, retry_after: str | None = None
    ) -> None:
        data = orjson.dumps(body)
        self.st.statuses[status] += 1
        self.send_response(status)
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.end_headers()
        self.wfile.write(data)


def _error(kind: str, message: str) -> dict[str, Any]:
    return {
        "errors": [
            {"errorType": kind, "message": f"{message}. Visit https://dev.fitbit.com/docs/oauth2 for more"}
        ],
        "success": False,
    }


def _days(a: str, b: str) -> Iterator[date]:
    day, last = date.fromisoformat(a), date.fromisoformat(b)
    while day <= last:
        yield day
        day += timedelta(days=1)


def _route(path: str, user: User, bodies: dict[str, Any]) -> Any:
    p = path.split("/")
    if path == "/1/user/-/profile.json":
        return {
            "user": {"encodedId": user.user_id, "timezone": user.timezone, "offsetFromUTCMillis": -28800000}
        }
    if path == "/1/user/-/devices.json":
        return [
            {
                "battery": "High",
                "deviceVersion": user.device,
                "id": "31",
                "lastSyncTime": user.last_sync,
                "type": "TRACKER",
            },
            {
                "battery": "High",
                "deviceVersion": "Aria",
                "id": "32",
                "lastSyncTime": user.last_sync,
                "type": "SCALE",
            },
        ]
    if path.startswith("/1/user/-/activities/") and path.endswith("/1d/1min.json"):
        kind, day = p[5], p[7]
        body = bodies.get(f"fitbit-activities-{kind}-1d-1m-intraday.json")
        if body is None:
            return None
        key = f"activities-{kind}"
        if body[key][0]["dateTime"] == day:
            return body
        empty = {"dataset": [], "datasetInterval": 1, "datasetType": "minute"}
        value = {"customHeartRateZones": [], "heartRateZones": []} if kind == "heart" else "0"
        return {key: [{"dateTime": day, "value": value}], f"{key}-intraday": empty}
    if path.startswith("/1/user/-/activities/steps/date/"):
        a, b = p[7], p[8].removesuffix(".json")
        have = {
            e["dateTime"]: e for e in bodies["fitbit-activities-steps-timeseries.json"]["activities-steps"]
        }
        return {
            "activities-steps": [have.get(str(d), {"dateTime": str(d), "value": "0"}) for d in _days(a, b)]
        }
    if path.startswith("/1/user/-/activities/heart/date/"):
        a, b = p[7], p[8].removesuffix(".json")
        days = bodies["fitbit-activities-heart-1d-1m-intraday.json"]["activities-heart"]
        return {"activities-heart": [d for d in days if a <= d["dateTime"] <= b]}
    if path.startswith("/1.2/user/-/sleep/date/"):
        a, b = p[6], p[7].removesuffix(".json")
        logs = bodies["fitbit-sleep-date-range.json"]["sleep"]
        return {"sleep": [s for s in logs if a <= s["dateOfSleep"] <= b]}
    if path.startswith("/1/user/-/body/log/weight/date/"):
        a, b = p[8], p[9].removesuffix(".json")
        return {"weight": [w for w in bodies["fitbit-body-log-weight.json"]["weight"] if a <= w["date"] <= b]}
    if path.startswith("/1/user/-/spo2/date/") and path.endswith("/all.json"):
        day = p[6]
        return {"dateTime": day, "minutes": SPO2_MINUTES if day == SPO2_DAY else []}
    if path.startswith("/1/user/-/spo2/date/"):
        a, b = p[6], p[7].removesuffix(".json")
        return [{"dateTime": SPO2_DAY, "value": SPO2_SUMMARY}] if a <= SPO2_DAY <= b else []
    return None


@pytest.fixture
def fitbit_server() -> Iterator[FitbitServer]:
    """The stand-in with its own Fitbit-shaped fixtures."""
    with serve() as server:
        yield server


@pytest.fixture
def recorded_server() -> Iterator[FitbitServer]:
    """The stand-in serving the recorded real responses (skips without ../shared)."""
    with serve(recorded=True) as server:
        yield server
