"""Fitbit OAuth 2.0: the authorization code grant with PKCE that connects a patient, the
patients' tokens kept in one encrypted file, and refreshes that never strand a patient.

Fitbit refresh tokens are single-use: a refresh answers with a new pair and the old refresh token
stops working. So the new pair is written (encrypted; a temporary file, fsync, rename) the
moment it arrives, before anything uses it, and the old pair is only ever dropped by that
rename. Before asking, the file notes that a refresh is in flight. A process that dies after
Fitbit answered but before the rename leaves the old pair in place with that note; the next run
presents the old refresh token again at once, which Fitbit is understood to answer with the same
new pair for a short while after its use. If it refuses, the error names the patient and the
command that reconnects them. Refreshes are serialized across processes by a lock file.

Tokens never reach a log line, an error message, a repr or the store's tables.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import orjson
from cryptography.fernet import Fernet, InvalidToken

from connectors import _oauth
from connectors._http import json_object
from connectors._oauth import AuthorizationRequest
from connectors._secrets import read_secret, write_private
from connectors.errors import SourceError, TransientError, safe_url
from connectors.kinds import Connected, Context
from connectors.wearables.fitbit.config import FitbitSource

PATIENT_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
"""A FHIR id (the token file is named after it)."""
REFRESH_MARGIN = 120.0
"""Refresh an access token this many seconds before Fitbit says it expires."""
CODE_LIFETIME = 600.0
"""Fitbit's authorization codes are valid for 10 minutes."""


class PatientAuthError(SourceError):
    """One patient's Fitbit access cannot be used until they are connected again; the others go on."""

    def __init__(self, source: str, patient: str, msg: str) -> None:
        super().__init__(source, f"patient {patient}: {msg}")
        self.patient = patient


@dataclass(frozen=True, kw_only=True)
class Tokens:
    """One patient's Fitbit grant. The two tokens stay out of every repr."""

    patient: str
    user_id: str
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at: float
    """Epoch seconds when Fitbit said the access token expires."""
    scope: str
    connected_at: float
    refreshing_since: float | None = None
    """Set, before asking, while a refresh is in flight; a crash leaves it set."""

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(self.scope.split())

    def expired(self, now: float) -> bool:
        return now >= self.expires_at - REFRESH_MARGIN


class TokenStore:
    """All patients' tokens of one source in one Fernet-encrypted file, readable by its owner
    only, rewritten whole and atomically under a lock (other processes wait)."""

    def __init__(self, source: str, path: Path, key: str | Path) -> None:
        """`key` is the key itself, or the file that holds it (made on first save if missing)."""
        self.source = source
        self.path = path
        self._key = key
        self._fernet: Fernet | None = None

    @classmethod
    def for_source(cls, source: FitbitSource, path: Path) -> TokenStore:
        """The source's store: its key from `token_key_env`, `token_key_file`, or the file beside
        the token file (`<token file>.key`)."""
        if source.token_key_env is not None:
            key = read_secret(source.name, "token_key", None, source.token_key_env, key="")
            return cls(source.name, path, key)
        return cls(source.name, path, source.token_key_file or path.with_name(path.name + ".key"))

    def check_patient(self, patient: str) -> str:
        if not PATIENT_ID.fullmatch(patient):
            raise SourceError(
                self.source, f"{patient!r} is not a FHIR Patient id (letters, digits, '-' and '.', 1-64)"
            )
        return patient

    def patients(self) -> list[str]:
        """The patients connected, in order."""
        return sorted(self._read()["patients"])

    def load(self, patient: str) -> Tokens | None:
        found = self._read()["patients"].get(patient)
        return Tokens(**found) if found is not None else None

    def save(self, tokens: Tokens) -> None:
        """Replace one patient's tokens (call under `locked()`): the old file stays whole until
        the rename."""
        data = self._read()
        data["patients"][tokens.patient] = asdict(tokens)
        data["pending"].pop(tokens.patient, None)
        self._write(data)

    def save_pending(self, patient: str, request: AuthorizationRequest, now: float) -> None:
        """A connection started and not yet finished (its PKCE verifier, for `--code` later)."""
        with self.locked():
            data = self._read()
            data["pending"][self.check_patient(patient)] = {**asdict(request), "started_at": now}
            self._write(data)

    def pending(self, patient: str, now: float) -> AuthorizationRequest | None:
        """The patient's started connection, while Fitbit's code for it can still be valid."""
        found = dict(self._read()["pending"].get(patient) or {})
        if not found or now - found.pop("started_at") > CODE_LIFETIME:
            return None
        return AuthorizationRequest(**found)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the file's lock: reads and writes of other processes that lock wait."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> dict[str, Any]:
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return {"patients": {}, "pending": {}}
        try:
            data: dict[str, Any] = orjson.loads(self._cipher(create=False).decrypt(blob))
        except InvalidToken:
            raise SourceError(
                self.source,
                f"cannot decrypt {self.path} with the configured token key; restore the key it was "
                "written with, or move the file away and connect the patients again",
            ) from None
        return data

    def _write(self, data: dict[str, Any]) -> None:
        blob = self._cipher(create=True).encrypt(orjson.dumps(data))
        write_private(self.path, blob)

    def _cipher(self, *, create: bool) -> Fernet:
        if self._fernet is None:
            key = self._key if isinstance(self._key, str) else self._key_from_file(self._key, create=create)
            try:
                self._fernet = Fernet(key.encode())
            except ValueError:
                raise SourceError(
                    self.source,
                    "the token key (token_key_env / token_key_file) is not a Fernet key (32 url-safe "
                    "base64 bytes); leave both unset to have one made beside the token file",
                ) from None
        return self._fernet

    def _key_from_file(self, path: Path, *, create: bool) -> str:
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            if not create:
                raise SourceError(
                    self.source,
                    f"the key file {path} of {self.path} is missing; restore it (the tokens cannot be "
                    "read without it), or move the token file away and connect the patients again",
                ) from None
        key = Fernet.generate_key().decode()
        write_private(path, key.encode() + b"\n")
        return key


def authorization_request(source: FitbitSource) -> AuthorizationRequest:
    """The address a patient opens to allow the source's scopes, with a fresh PKCE verifier."""
    return _oauth.authorization_request(
        authorize_url=source.authorize_url,
        client_id=source.client_id,
        redirect_uri=source.redirect_uri,
        scopes=list(source.scopes),
    )


def code_from_redirect(source: str, request: AuthorizationRequest, answer: str) -> str:
    """The authorization code from the address Fitbit redirected the browser to (or the bare code)."""
    return _oauth.code_from_redirect(source, request, answer, vendor="Fitbit")


class FitbitOAuth:
    """The token endpoint, with the patients' token store: connect, and refresh safely."""

    def __init__(
        self,
        source: FitbitSource,
        store: TokenStore,
        *,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.store = store
        self._clock = clock
        self._http = http or httpx.Client(timeout=source.timeout_seconds)
        self._secret = (
            read_secret(
                source.name, "client_secret", source.client_secret_file, source.client_secret_env, key=""
            )
            if source.client_secret_file or source.client_secret_env
            else None
        )

    def close(self) -> None:
        self._http.close()

    def connect(self, patient: str, request: AuthorizationRequest, code: str) -> Tokens:
        """Exchange the code for the patient's first pair, and save it."""
        self.store.check_patient(patient)  # a bad patient id fails before the code is spent
        body = self._token_request(
            patient,
            {
                "grant_type": "authorization_code",
                "code": code,
                "code_verifier": request.verifier,
                "redirect_uri": request.redirect_uri,
            },
            what="exchanging the authorization code",
        )
        now = self._clock()
        tokens = _tokens_from(patient, body, now, connected_at=now)
        with self.store.locked():
            self.store.save(tokens)
        return tokens

    def current(self, patient: str) -> Tokens:
        """The patient's tokens, refreshed first when the access token has (nearly) expired."""
        tokens = self.store.load(patient)
        if tokens is None:
            raise PatientAuthError(self.source.name, patient, f"is not connected; {self._reconnect(patient)}")
        if tokens.expired(self._clock()) or tokens.refreshing_since is not None:
            return self.refresh(patient, tokens)
        return tokens

    def refresh(self, patient: str, stale: Tokens) -> Tokens:
        """A new pair for the patient, saved before it is returned. `stale` is the pair that
        failed or expired: when another process has replaced it meanwhile, that pair is used."""
        with self.store.locked():
            tokens = self.store.load(patient)
            if tokens is None:
                raise PatientAuthError(
                    self.source.name, patient, f"is not connected; {self._reconnect(patient)}"
                )
            if tokens.access_token != stale.access_token and not tokens.expired(self._clock()):
                return tokens  # refreshed by someone else while we waited for the lock
            interrupted = tokens.refreshing_since
            self.store.save(replace(tokens, refreshing_since=interrupted or self._clock()))
            body = self._token_request(
                patient,
                {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token},
                what="refreshing the access token",
                interrupted=interrupted,
            )
            fresh = _tokens_from(patient, body, self._clock(), connected_at=tokens.connected_at)
            self._persist(fresh)
            return fresh

    def _persist(self, tokens: Tokens) -> None:
        """The one place a patient's old pair is dropped (by the atomic rename in `save`)."""
        self.store.save(tokens)

    def _token_request(
        self, patient: str, form: dict[str, str], *, what: str, interrupted: float | None = None
    ) -> dict[str, Any]:
        url = self.source.token_url
        auth: httpx.Auth = httpx.Auth()  # none
        if self._secret is not None:
            auth = httpx.BasicAuth(self.source.client_id, self._secret)
        else:
            form = {**form, "client_id": self.source.client_id}
        try:
            response = self._http.post(url, data=form, auth=auth, headers={"Accept": "application/json"})
        except httpx.TransportError as e:
            raise TransientError(
                f"source {self.source.name!r}: {what} for patient {patient} at {safe_url(url)} failed "
                f"({type(e).__name__}); the saved tokens are kept, the next run tries again"
            ) from None
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientError(
                f"source {self.source.name!r}: {what} for patient {patient} answered "
                f"{response.status_code}; the saved tokens are kept, the next run tries again"
            )
        body = json_object(response)
        if response.is_success and isinstance(body.get("access_token"), str):
            return body
        error = error_type(body) or str(response.status_code)
        if error == "invalid_client":
            raise SourceError(
                self.source.name,
                f"Fitbit refused client_id {self.source.client_id!r} ({what}): check client_id and the "
                "client secret, and the application type registered at Fitbit",
            )
        hint = self._reconnect(patient)
        if interrupted is not None:
            hint = (
                f"a refresh begun at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(interrupted))} UTC "
                "was cut short before its new tokens were saved, and Fitbit no longer accepts the old "
                f"ones; {hint}"
            )
        raise PatientAuthError(self.source.name, patient, f"Fitbit refused {what} ({error}); {hint}")

    def _reconnect(self, patient: str) -> str:
        return reconnect(self.source.name, patient)


def reconnect(source: str, patient: str) -> str:
    """The fix for a patient whose grant is gone."""
    return f"connect them again: twinhub wearables connect fitbit --patient {patient} --source {source}"


def error_type(body: dict[str, Any]) -> str | None:
    """Fitbit's errorType (or the OAuth `error`); never its message, which may quote a token."""
    errors = body.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return str(errors[0].get("errorType", "")) or None
    return str(body["error"]) if "error" in body else None


def _tokens_from(patient: str, body: dict[str, Any], now: float, *, connected_at: float) -> Tokens:
    return Tokens(
        patient=patient,
        user_id=str(body.get("user_id", "")),
        access_token=body["access_token"],
        refresh_token=str(body.get("refresh_token", "")),
        expires_at=now + float(body.get("expires_in", 28800)),
        scope=str(body.get("scope", "")),
        connected_at=connected_at,
    )


class FitbitAccount:
    """Connecting a patient's Fitbit (`twinhub wearables connect fitbit`): the address they open,
    then the code Fitbit sends their browser back with, exchanged for tokens kept encrypted."""

    vendor = "Fitbit"

    def __init__(self, source: FitbitSource, store: TokenStore) -> None:
        self.source = source
        self.store = store

    @classmethod
    def for_source(cls, source: FitbitSource, context: Context) -> FitbitAccount:
        return cls(source, TokenStore.for_source(source, source.token_path(context.store)))

    def start(self, patient: str) -> str:
        request = authorization_request(self.source)
        self.store.save_pending(self.store.check_patient(patient), request, time.time())
        return request.url

    def finish(self, patient: str, answer: str) -> Connected:
        request = self.store.pending(self.store.check_patient(patient), time.time())
        if request is None:
            raise SourceError(
                self.source.name,
                f"no connection of patient {patient} was started in the last 10 minutes; run the "
                "command without --code to start one",
            )
        oauth = FitbitOAuth(self.source, self.store)
        try:
            tokens = oauth.connect(patient, request, code_from_redirect(self.source.name, request, answer))
        finally:
            oauth.close()
        warnings: tuple[str, ...] = ()
        if missing := sorted(set(self.source.scopes) - tokens.scopes):
            warnings = (
                f"the patient did not allow {', '.join(missing)}; what needs it is not pulled "
                "(connect again to ask anew)",
            )
        return Connected(
            summary=f"Connected patient {patient} to Fitbit user {tokens.user_id}; the tokens are kept "
            f"encrypted in {self.store.path}",
            warnings=warnings,
        )
