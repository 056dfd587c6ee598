"""`twinhub wearables` as a user runs it (real subprocesses) against the local Fitbit stand-in,
and a fitbit source's config."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from connectors.errors import ConfigError, SourceError
from connectors.fitbit import FitbitConnector
from flows.config import fitbit_source, load_settings
from flows.sync import build_connector
from tests.conftest import TWINHUB, run_cli
from tests.fitbit_server import CLIENT_ID, FitbitServer


def write_config(tmp_path: Path, server: FitbitServer, extra: str = "") -> Path:
    config = tmp_path / "twinhub.toml"
    config.write_text(
        f'[store]\npath = "store"\n\n[[sources]]\nname = "watch"\nkind = "fitbit"\n'
        f'client_id = "{CLIENT_ID}"\n'
        f'redirect_uri = "http://127.0.0.1:9/fitbit/callback"\ntoken_key_file = "fitbit.key"\n'
        f'api_url = "{server.url}"\nauthorize_url = "{server.url}/oauth2/authorize"\n{extra}'
    )
    return config


@pytest.mark.slow
def test_connect_a_patient_list_and_disconnect(fitbit_server: FitbitServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, fitbit_server)
    key = tmp_path / "fitbit.key"
    run_cli("--config", str(config), "wearables", "key", str(key))
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    again = run_cli("--config", str(config), "wearables", "key", str(key), check=False)
    assert again.returncode == 1 and "exists; a new key would leave the tokens" in again.stderr

    connect = subprocess.Popen(
        [TWINHUB, "--config", str(config), "wearables", "connect", "fitbit", "--patient", "p1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert connect.stdout is not None and connect.stdin is not None
    url = ""
    for line in connect.stdout:
        if line.startswith(fitbit_server.url):
            url = line.strip()
            break
    assert url, "no authorization URL printed"
    # The patient signs in at Fitbit, allows access, and copies the address the browser lands on.
    connect.stdin.write(fitbit_server.authorize(url, "USER1") + "\n")
    connect.stdin.flush()
    out, err = connect.communicate(timeout=120)
    assert connect.returncode == 0, err
    assert "Connected patient p1 to Fitbit user USER1" in " ".join(out.split())
    assert (tmp_path / "store" / "secrets" / "watch" / "p1.token").is_file()

    listed = run_cli("--config", str(config), "wearables", "patients", "watch")
    assert "p1" in listed.stdout and "USER1" in listed.stdout
    assert not [t for t in fitbit_server.issued_tokens() if t in listed.stdout + out + err]

    run_cli("--config", str(config), "wearables", "disconnect", "watch", "--patient", "p1")
    assert not (tmp_path / "store" / "secrets" / "watch" / "p1.token").exists()
    gone = run_cli(
        "--config", str(config), "wearables", "disconnect", "watch", "--patient", "p1", check=False
    )
    assert gone.returncode == 1 and "patient p1 is not connected to source 'watch'" in gone.stderr


@pytest.mark.slow
def test_a_foreign_redirect_is_refused_and_nothing_is_saved(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path, fitbit_server)
    run_cli("--config", str(config), "wearables", "key", str(tmp_path / "fitbit.key"))
    result = subprocess.run(
        [TWINHUB, "--config", str(config), "wearables", "connect", "watch", "--patient", "p1"],
        input="http://127.0.0.1:9/fitbit/callback?code=abc&state=someone-elses\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "the redirect's state does not match this connection" in result.stderr
    assert not (tmp_path / "store" / "secrets").exists()


def test_the_source_builds_with_its_tokens_in_the_store_folder(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path, fitbit_server)
    (tmp_path / "fitbit.key").write_text("bm90IGEga2V5IGJ1dCAzMiBieXRlcyBsb25nISEhISE=\n")
    settings = load_settings(config)
    source = fitbit_source(settings, "fitbit")  # the kind picks the only fitbit source
    connector = build_connector(settings, source)
    assert isinstance(connector, FitbitConnector)
    assert connector.tokens.folder == tmp_path / "store" / "secrets" / "watch"
    with pytest.raises(SourceError, match="no patient is connected yet"):
        connector.check()
    with pytest.raises(ConfigError, match="no fitbit source of that name"):
        fitbit_source(settings, "other")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            'client_secret = "abc"\n',
            "config sources[0]: secrets never go in the config file: remove `client_secret`",
        ),
        ('data = ["pulse"]\n', "config sources[0].data[0]: Input should be 'heart_rate', 'steps'"),
        ('tokens_path = "t"\ncolour = "red"\n', "config sources[0].colour: is not a known setting"),
    ],
)
def test_config_mistakes_are_one_line(
    fitbit_server: FitbitServer, tmp_path: Path, extra: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(tmp_path, fitbit_server, extra))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
