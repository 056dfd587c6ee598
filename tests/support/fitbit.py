"""Fitbit sources against the Web API stand-in (`fitbit_server`): a source, a connected patient, a pull."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa

from connectors.base import Batch, Watermark, Window
from connectors.wearables.fitbit.api import FitbitConnector
from connectors.wearables.fitbit.config import SCOPE, Data, FitbitSource
from connectors.wearables.fitbit.oauth import (
    FitbitOAuth,
    Tokens,
    TokenStore,
    authorization_request,
    code_from_redirect,
)
from tests.support.fitbit_server import CLIENT_ID, FitbitServer

NOW = datetime(2016, 12, 15, 12, tzinfo=UTC)


AUG_23 = datetime(2015, 8, 23, tzinfo=UTC)  # 2015-08-22 in Los Angeles: intraday 08-20..22


def make_source(server: FitbitServer, tmp_path: Path, *data: Data, **extra: object) -> FitbitSource:
    scopes = [SCOPE[d] for d in data or SCOPE] + ["profile", "settings"]
    return FitbitSource.model_validate(
        {
            "name": "fitbit",
            "kind": "fitbit",
            "client_id": CLIENT_ID,
            "redirect_uri": "http://127.0.0.1:9/fitbit/callback",
            "api_url": server.url,
            "authorize_url": f"{server.url}/oauth2/authorize",
            "token_url": f"{server.url}/oauth2/token",
            "token_file": tmp_path / "secrets" / "fitbit.tokens",
            "scopes": scopes,
            **extra,
        }
    )


def token_store(source: FitbitSource) -> TokenStore:
    return TokenStore.for_source(source, source.token_path(Path("unused")))


def connect(
    server: FitbitServer,
    source: FitbitSource,
    store: TokenStore,
    patient: str = "p1",
    user: str = "USER1",
    scopes: str | None = None,
) -> Tokens:
    request = authorization_request(source)
    redirect = server.authorize(request.url, user, scopes)
    oauth = FitbitOAuth(source, store)
    try:
        return oauth.connect(patient, request, code_from_redirect(source.name, request, redirect))
    finally:
        oauth.close()


def pull(
    source: FitbitSource,
    store: TokenStore,
    since: Watermark | None = None,
    *,
    now: datetime = NOW,
    sleep: Callable[[float], None] | None = None,
    window: Window | None = None,
) -> tuple[list[Batch], FitbitConnector]:
    connector = FitbitConnector(source, store, clock=now.timestamp, sleep=sleep or (lambda s: None))
    return list(connector.pull(since, window)), connector


def counts(batches: list[Batch]) -> dict[str, int]:
    return dict(Counter(frame(batches)["metric"].to_list()))


def frame(batches: list[Batch]) -> pl.DataFrame:
    found = pl.from_arrow(pa.concat_tables([b.samples for b in batches if b.samples is not None]))
    assert isinstance(found, pl.DataFrame)
    return found
