from __future__ import annotations

from pathlib import Path

import pytest

from connectors.errors import ConfigError
from flows.config import load_settings


def load(tmp_path: Path, body: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "twinhub.toml"
    path.write_text(body)
    return load_settings(path)


SOURCE = '[[sources]]\nname = "s"\nkind = "fhir-ndjson"\n'


def test_paths_are_relative_to_the_file_and_env_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load(tmp_path, f'{SOURCE}path = "data"\nschedule = "0 2 * * *"\n')
    assert settings.sources[0].path == tmp_path / "data"
    assert settings.store.path == tmp_path / ".twinhub"
    monkeypatch.setenv("TWINHUB_STORE__PATH", "/elsewhere")
    assert load(tmp_path, SOURCE + 'path = "d"\n').store.path == Path("/elsewhere")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            '[[sources]]\nname = "s"\nkind = "hl7"\npath = "x"\n',
            "config sources[0]: unknown kind 'hl7'; use one of: fhir-ndjson",
        ),
        (SOURCE, "config sources[0].path: is required; add `path = ...`"),
        (
            SOURCE + 'path = "x"\nschedule = "every day"\n',
            "config sources: schedule 'every day' of source 's' is not a cron expression; use five fields",
        ),
        (
            SOURCE + 'path = "x"\ncolour = "red"\n',
            "config sources[0].colour: is not a known setting",
        ),
        ("[store\n", "is not valid TOML"),
    ],
)
def test_bad_config_is_one_line_naming_key_and_fix(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, body)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; pass --config"):
        load_settings(tmp_path / "none.toml")
