"""How a source proves who it is to a FHIR server: SMART Backend Services, a static bearer
token, HTTP basic, or nothing.

Secrets come from files or environment variables named in the config, never from the config
itself, and live only in memory: no log line, error or store row holds one.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import orjson
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey, import_key
from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors._http import json_object
from connectors._secrets import read_secret, refuse_inline_secrets
from connectors.errors import SourceError, TransientError, safe_url

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
REFRESH_MARGIN = 60.0
"""Refresh a token this long before it expires (or a quarter of its life, if shorter)."""
SECRET_KEYS = ("token", "password", "private_key", "client_secret", "access_token", "key")


class _AuthBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        return refuse_inline_secrets(data, SECRET_KEYS)


class NoAuth(_AuthBase):
    type: Literal["none"] = "none"


class BearerAuth(_AuthBase):
    """A static bearer token, e.g. one issued by an API gateway."""

    type: Literal["bearer"]
    token_file: Path | None = None
    token_env: str | None = None


class BasicAuth(_AuthBase):
    type: Literal["basic"]
    username: str
    password_file: Path | None = None
    password_env: str | None = None


class SmartAuth(_AuthBase):
    """SMART Backend Services: client_credentials with a signed JWT assertion (or, where the
    server allows it, a client secret)."""

    type: Literal["smart"]
    client_id: str
    private_key_file: Path | None = None
    """A PEM private key, or a JWK / JWKS (JSON) holding private keys; `kid` picks one."""
    private_key_env: str | None = None
    client_secret_file: Path | None = None
    client_secret_env: str | None = None
    kid: str | None = None
    alg: Literal["RS384", "ES384"] = "RS384"
    scope: str = "system/*.rs"
    token_url: str | None = None
    """Discovered from [base]/.well-known/smart-configuration when not set."""
    jku: str | None = None


AuthConfig = Annotated[NoAuth | BearerAuth | BasicAuth | SmartAuth, Field(discriminator="type")]


def build_auth(source: str, config: AuthConfig, base_url: str, *, timeout: float = 30.0) -> httpx.Auth | None:
    """The httpx auth for a source; reads its secret now, so a missing one fails before any I/O."""
    if isinstance(config, BearerAuth):
        token = read_secret(source, "token", config.token_file, config.token_env)
        return _HeaderAuth(f"Bearer {token}")
    if isinstance(config, BasicAuth):
        password = read_secret(source, "password", config.password_file, config.password_env)
        pair = base64.b64encode(f"{config.username}:{password}".encode()).decode()
        return _HeaderAuth(f"Basic {pair}")
    if isinstance(config, SmartAuth):
        return SmartBackendAuth(source, config, base_url, timeout=timeout)
    return None


class _HeaderAuth(httpx.Auth):
    def __init__(self, header: str) -> None:
        self._header = header

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


class SmartBackendAuth(httpx.Auth):
    """Gets an access token with a signed client assertion, caches it, refreshes it shortly
    before it expires and once more when the server answers 401. Token requests go through
    a client of their own, so the data requests this guards can stream."""

    def __init__(self, source: str, config: SmartAuth, base_url: str, *, timeout: float = 30.0) -> None:
        self.source = source
        self.config = config
        self.base_url = base_url
        symmetric = config.client_secret_file or config.client_secret_env
        self._key = None if symmetric else _signing_key(source, config)
        self._secret = (
            read_secret(source, "client_secret", config.client_secret_file, config.client_secret_env)
            if self._key is None
            else None
        )
        self._token: str | None = None
        self._token_url = config.token_url  # else discovered once
        self._expires = 0.0
        self._lock = threading.Lock()
        self._timeout = timeout

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._access_token()}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {self._access_token(refresh=True)}"
            yield request

    def _access_token(self, *, refresh: bool = False) -> str:
        with self._lock:
            if refresh or self._token is None or time.time() > self._expires:
                try:
                    with httpx.Client(timeout=self._timeout, headers={"Accept": "application/json"}) as http:
                        self._token, lifetime = self._request_token(http)
                except httpx.TransportError as e:
                    raise TransientError(
                        f"could not reach the SMART token endpoint ({type(e).__name__})"
                    ) from None
                self._expires = time.time() + lifetime - min(REFRESH_MARGIN, lifetime / 4)
            return self._token

    def _request_token(self, http: httpx.Client) -> tuple[str, float]:
        token_url = self._token_url = self._token_url or self._token_endpoint(http)
        form = {"grant_type": "client_credentials", "scope": self.config.scope}
        auth = httpx.Auth()  # none
        if self._key is not None:
            form |= {"client_assertion_type": ASSERTION_TYPE, "client_assertion": self._assertion(token_url)}
        else:
            auth = httpx.BasicAuth(self.config.client_id, self._secret or "")
        response = http.post(token_url, data=form, auth=auth)
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientError(f"got {response.status_code} from the SMART token endpoint")
        body = json_object(response)
        if not response.is_success or not isinstance(body.get("access_token"), str):
            reason = f"{body.get('error', response.status_code)}: {body.get('error_description', '')}"
            raise SourceError(
                self.source,
                f"SMART token request to {safe_url(token_url)} was refused ({reason.rstrip(': ')}); "
                f"check auth.client_id {self.config.client_id!r}, the key and kid, and that the server "
                "holds the matching public key",
            )
        return body["access_token"], float(body.get("expires_in", 300))

    def _token_endpoint(self, http: httpx.Client) -> str:
        url = f"{self.base_url}/.well-known/smart-configuration"
        response = http.get(url)
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientError(f"got {response.status_code} from {safe_url(url)}")
        endpoint = json_object(response).get("token_endpoint") if response.is_success else None
        if not isinstance(endpoint, str):
            raise SourceError(
                self.source,
                f"{safe_url(url)} gave no token_endpoint ({response.status_code}); set auth.token_url",
            )
        return endpoint

    def _assertion(self, token_url: str) -> str:
        now = int(time.time())
        kid = self.config.kid or getattr(self._key, "kid", None)
        header = {"alg": self.config.alg, "typ": "JWT", "kid": kid}
        if self.config.jku:
            header["jku"] = self.config.jku
        claims = {
            "iss": self.config.client_id,
            "sub": self.config.client_id,
            "aud": token_url,
            "exp": now + 290,
            "iat": now,
            "jti": uuid.uuid4().hex,
        }
        assert self._key is not None
        return jwt.encode(header, claims, self._key, algorithms=[self.config.alg])


def _signing_key(source: str, config: SmartAuth) -> RSAKey | ECKey:
    """The private key named by the config, checked against `alg` and `kid` before any request."""
    text = read_secret(source, "private_key", config.private_key_file, config.private_key_env)
    kty = "RSA" if config.alg.startswith("RS") else "EC"
    try:
        if text.startswith("{"):
            data = orjson.loads(text)
            keys = KeySet.import_key_set(data if "keys" in data else {"keys": [data]})
            candidates = [k for k in keys if config.kid is None or k.kid == config.kid]
            if not candidates:
                known = ", ".join(repr(k.kid) for k in keys) or "none"
                raise SourceError(
                    source, f"auth.kid {config.kid!r} is not in the key set (it holds {known}); fix auth.kid"
                )
            if len(candidates) > 1:
                raise SourceError(source, "the key set holds several keys; set auth.kid to pick one")
            key = candidates[0]
        else:
            key = _import_pem(text)
    except (JoseError, ValueError, TypeError) as e:
        raise SourceError(
            source, f"the private key (auth.private_key_*) cannot be read as PEM or JWK ({type(e).__name__})"
        ) from None
    if key.key_type != kty or (kty == "EC" and getattr(key, "curve_name", "P-384") != "P-384"):
        raise SourceError(source, f"auth.alg {config.alg} needs a {kty} key of the right size; this is not")
    if not key.is_private:
        raise SourceError(source, "auth.private_key_* holds a public key; give the private key")
    if config.kid is None and key.kid is None:
        raise SourceError(source, "set auth.kid to the key id registered with the server")
    return key  # type: ignore[return-value]


def _import_pem(text: str) -> RSAKey | ECKey:
    try:
        return import_key(text, "RSA")
    except (JoseError, ValueError, TypeError):
        return import_key(text, "EC")
