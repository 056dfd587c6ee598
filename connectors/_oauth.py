"""OAuth 2.0 authorization code grant with PKCE (RFC 7636), as wearable vendors use it to let a
patient connect their account: the address the patient opens, and the code from the address the
vendor sends their browser back to."""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from connectors.errors import SourceError


@dataclass(frozen=True, kw_only=True)
class AuthorizationRequest:
    """A started connection: the address the patient opens, and what proves the answer is ours."""

    url: str = field(repr=False)
    state: str = field(repr=False)
    verifier: str = field(repr=False)
    redirect_uri: str


def authorization_request(
    *, authorize_url: str, client_id: str, redirect_uri: str, scopes: list[str]
) -> AuthorizationRequest:
    """The authorization URL with a fresh PKCE verifier (S256) and state."""
    verifier = secrets.token_urlsafe(96)[:128]
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(24)
    query = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": " ".join(scopes),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": state,
    }
    url = f"{authorize_url}?{urlencode(query, quote_via=quote)}"
    return AuthorizationRequest(url=url, state=state, verifier=verifier, redirect_uri=redirect_uri)


def code_from_redirect(source: str, request: AuthorizationRequest, answer: str, *, vendor: str) -> str:
    """The authorization code from the address `vendor` redirected the browser to (or the bare code)."""
    answer = answer.strip()
    if not answer:
        raise SourceError(source, "no redirect address given; paste the address the browser was sent to")
    if "://" not in answer and "?" not in answer and "=" not in answer:
        return answer  # the code alone: the state cannot be checked, the PKCE verifier still binds it
    query = parse_qs(urlsplit(answer).query or answer.lstrip("?"))
    if "error" in query:
        why = query.get("error_description", query["error"])[0]
        raise SourceError(
            source, f"{vendor} did not authorize ({query['error'][0]}: {why}); start the connection again"
        )
    if query.get("state", [None])[0] != request.state:
        raise SourceError(
            source,
            "the redirect's state does not match this connection (an old or foreign link); start again",
        )
    codes = query.get("code")
    if not codes or not codes[0]:
        raise SourceError(source, "the redirect address holds no code; paste the whole address")
    return codes[0]
