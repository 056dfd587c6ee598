"""`twinhub wearables connect fitbit` as a user runs it (real subprocesses) against the local
Fitbit stand-in, and a fitbit source's config."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.errors import ConfigError, SourceError
from connectors.wearables.fitbit.api import FitbitConnector
from connectors.wearables.fitbit.config import FitbitSource
from connectors.wearables.fitbit.oauth import TokenStore
from flows.config import load_settings
from flows.sync import build_connector
from tests.support.cli import TWINHUB, run_cli
from tests.support.fitbit_server import CLIENT_ID, FitbitServer, serve


@pytest.fixture
def fitbit_server() -> Iterator[FitbitServer]:
    with serve() as server:
        yield server


def write_config(tmp_path: Path, server: FitbitServer, extra: str = "", name: str = "watch") -> Path:
    config = tmp_path / "twinhub.toml"
    with config.open("a") as fh:
        if not config.stat().st_size:
            fh.write('[store]\npath = "store"\n')
        fh.write(
            f'\n[[sources]]\nname = "{name}"\nkind = "fitbit"\nclient_id = "{CLIENT_ID}"\n'
            'redirect_uri = "http://127.0.0.1:9/fitbit/callback"\n'
            f'api_url = "{server.url}"\nauthorize_url = "{server.url}/oauth2/authorize"\n'
            f'token_url = "{server.url}/oauth2/token"\n{extra}'
        )
    return config


def stored(config: Path) -> TokenStore:
    settings = load_settings(config)
    source = settings.sources[0]
    assert isinstance(source, FitbitSource)
    return TokenStore.for_source(source, source.token_path(settings.store.path))


@pytest.mark.slow
def test_connect_prints_the_address_and_takes_the_pasted_redirect(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path, fitbit_server)
    connect = subprocess.Popen(
        [TWINHUB, "--config", str(config), "wearables", "connect", "fitbit", "--patient", "p1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert connect.stdout is not None and connect.stdin is not None
    url = next((line.strip() for line in connect.stdout if line.startswith(fitbit_server.url)), "")
    assert url, "no authorization URL printed"
    # The patient signs in at Fitbit, allows access, and copies the address the browser lands on.
    connect.stdin.write(fitbit_server.authorize(url, "USER1") + "\n")
    connect.stdin.flush()
    out, err = connect.communicate(timeout=120)
    assert connect.returncode == 0, err
    assert "Connected patient p1 to Fitbit user USER1" in " ".join(out.split())
    token_file = tmp_path / "store" / "secrets" / "watch.tokens"
    assert stored(config).patients() == ["p1"]
    clear = token_file.read_bytes() + token_file.with_name("watch.tokens.lock").read_bytes()
    assert not [t for t in fitbit_server.issued_tokens() if t.encode() in clear or t in out + err]


@pytest.mark.slow
def test_connect_later_with_code_and_refuse_a_foreign_redirect(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path, fitbit_server)
    write_config(tmp_path, fitbit_server, name="other")
    base = [TWINHUB, "--config", str(config), "wearables", "connect", "fitbit", "--patient", "p1"]
    several = subprocess.run(base, input="", capture_output=True, text=True, timeout=120)
    assert several.returncode == 1
    assert "there are several fitbit sources (watch, other); pick one with --source NAME" in several.stderr

    started = subprocess.run(
        [*base, "--source", "watch"], input="", capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 0, started.stderr
    url = next(line for line in started.stdout.splitlines() if line.startswith(fitbit_server.url))
    assert "--code CODE" in started.stdout  # nothing pasted: how to finish later
    foreign = run_cli(
        *base[1:], "--source", "watch", "--code", "http://127.0.0.1:9/cb?code=x&state=y", check=False
    )
    assert foreign.returncode == 1 and "the redirect's state does not match this connection" in foreign.stderr
    assert stored(config).patients() == []

    done = run_cli(*base[1:], "--source", "watch", "--code", fitbit_server.authorize(url, "USER7"))
    assert "Connected patient p1 to Fitbit user USER7" in " ".join(done.stdout.split())
    again = run_cli(*base[1:], "--source", "watch", "--code", "whatever", check=False)
    assert again.returncode == 1 and "no connection of patient p1 was started" in again.stderr


def test_the_source_builds_with_its_tokens_in_the_store_folder(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    settings = load_settings(write_config(tmp_path, fitbit_server))
    source = settings.sources[0]
    connector = build_connector(settings, source)
    assert isinstance(connector, FitbitConnector)
    assert connector.tokens.path == tmp_path / "store" / "secrets" / "watch.tokens"
    with pytest.raises(SourceError, match="no patient is connected yet"):
        connector.check()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            'client_secret = "abc"\n',
            "config sources[0]: secrets never go in the config file: remove `client_secret`",
        ),
        ('scopes = ["pulse"]\n', "config sources[0].scopes[0]: Input should be 'activity', 'heartrate'"),
        ('since = "last week"\n', "config sources[0].since: Input should be a valid date"),
        ('colour = "red"\n', "config sources[0].colour: is not a known setting"),
    ],
)
def test_config_mistakes_are_one_line(
    fitbit_server: FitbitServer, tmp_path: Path, extra: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(tmp_path, fitbit_server, extra))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
