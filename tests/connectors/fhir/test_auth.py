"""Auth config and keys: every mistake is one line naming the setting; the assertion is a
valid SMART client assertion signed with the configured key."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest
from joserfc import jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import ECKey, KeySet, RSAKey

from connectors.errors import SourceError
from connectors.fhir.auth import SmartAuth, SmartBackendAuth, build_auth


def smart(tmp_path: Path, key_text: str, **extra: object) -> SmartAuth:
    path = tmp_path / "key"
    path.write_text(key_text)
    return SmartAuth.model_validate({"type": "smart", "client_id": "twin", "private_key_file": path, **extra})


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_assertion_is_signed_with_the_key_and_names_the_client(tmp_path: Path, alg: str) -> None:
    key = RSAKey.generate_key(2048) if alg == "RS384" else ECKey.generate_key("P-384")
    config = smart(tmp_path, key.as_pem(private=True).decode(), kid="k-1", alg=alg)
    auth = SmartBackendAuth("ehr", config, "https://ehr.example/fhir")
    token = jwt.decode(auth._assertion("https://ehr.example/token"), key, algorithms=[alg])
    assert token.header["kid"] == "k-1"
    assert token.header["alg"] == alg
    claims = token.claims
    assert claims["iss"] == claims["sub"] == "twin"
    assert claims["aud"] == "https://ehr.example/token"
    assert 0 < claims["exp"] - claims["iat"] <= 300


def test_kid_picks_a_key_from_a_jwks(tmp_path: Path) -> None:
    keys = [RSAKey.generate_key(2048, parameters={"kid": kid}) for kid in ("a", "b")]
    text = orjson.dumps(KeySet(keys).as_dict(private=True)).decode()
    auth = SmartBackendAuth("ehr", smart(tmp_path, text, kid="b"), "https://x/fhir")
    jwt.decode(auth._assertion("https://x/token"), keys[1], algorithms=["RS384"])
    with pytest.raises(BadSignatureError):  # signed with b's key, not a's
        jwt.decode(auth._assertion("https://x/token"), keys[0], algorithms=["RS384"])


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (
            lambda: _jwks("a"),
            {"kid": "zz"},
            "auth.kid 'zz' is not in the key set (it holds 'a'); fix auth.kid",
        ),
        (lambda: _jwks("a", "b"), {}, "the key set holds several keys; set auth.kid"),
        (
            lambda: RSAKey.generate_key(2048).as_pem(private=False).decode(),
            {"kid": "k"},
            "holds a public key; give the private key",
        ),
        (
            lambda: RSAKey.generate_key(2048).as_pem(private=True).decode(),
            {"kid": "k", "alg": "ES384"},
            "auth.alg ES384 needs a EC key",
        ),
        (lambda: RSAKey.generate_key(2048).as_pem(private=True).decode(), {}, "set auth.kid"),
        (lambda: "not a key", {"kid": "k"}, "cannot be read as PEM or JWK"),
    ],
)
def test_key_mistakes_are_one_line(tmp_path: Path, make: object, extra: dict[str, str], message: str) -> None:
    text = make()  # type: ignore[operator]
    with pytest.raises(SourceError) as caught:
        SmartBackendAuth("ehr", smart(tmp_path, text, **extra), "https://x/fhir")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_secrets_come_from_exactly_one_of_file_or_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from connectors.fhir.auth import BearerAuth

    with pytest.raises(SourceError, match=r"set exactly one of auth\.token_file or auth\.token_env"):
        build_auth("ehr", BearerAuth(type="bearer"), "https://x/fhir")
    with pytest.raises(SourceError, match=r"environment variable EHR_TOKEN .* is not set"):
        build_auth("ehr", BearerAuth(type="bearer", token_env="EHR_TOKEN"), "https://x/fhir")
    monkeypatch.setenv("EHR_TOKEN", "tok-123")
    auth = build_auth("ehr", BearerAuth(type="bearer", token_env="EHR_TOKEN"), "https://x/fhir")
    assert auth is not None
    sent = next(auth.sync_auth_flow(httpx.Request("GET", "https://x/fhir/Patient")))
    assert sent.headers["Authorization"] == "Bearer tok-123"
    with pytest.raises(SourceError, match=r"cannot read auth\.token_file"):
        build_auth("ehr", BearerAuth(type="bearer", token_file=tmp_path / "missing"), "https://x/fhir")


def _jwks(*kids: str) -> str:
    keys = [RSAKey.generate_key(2048, parameters={"kid": kid}) for kid in kids]
    return orjson.dumps(KeySet(keys).as_dict(private=True)).decode()
