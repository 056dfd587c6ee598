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
            "config sources[0]: unknown kind 'hl7'; use one of: apple-health, fhir-bulk, fhir-ndjson,",
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


EHR = '[[sources]]\nname = "ehr"\nkind = "fhir-search"\nbase_url = "https://ehr.example/fhir/"\n'


def test_server_sources_resolve_key_files_relative_to_the_config(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        EHR + 'resource_types = ["Patient"]\n[sources.auth]\ntype = "smart"\nclient_id = "c"\n'
        'private_key_file = "keys/ehr.pem"\nkid = "k1"\n',
    )
    source = settings.sources[0]
    assert source.base_url == "https://ehr.example/fhir"
    assert source.auth.private_key_file == tmp_path / "keys" / "ehr.pem"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (EHR, "resource_types is required for a fhir-search source"),
        (
            EHR + 'resource_types = ["Patient"]\n[sources.auth]\ntype = "bearer"\ntoken = "s3cr3t-value"\n',
            "secrets never go in the config file: remove `token`",
        ),
        (
            EHR + 'resource_types = ["Patient"]\n[sources.auth]\ntype = "oauth"\n',
            "config sources[0].auth: unknown type 'oauth'; use one of: none, bearer, basic, smart",
        ),
        (
            EHR.replace("https://ehr.example/fhir/", "ehr.example") + 'resource_types = ["Patient"]\n',
            "config sources[0].base_url: 'ehr.example' is not an http(s) URL",
        ),
        (
            EHR + 'resource_types = ["Patient"]\nsearch_params = {Patient = "_count=5"}\n',
            "search_params.Patient sets _count; twinhub sets those itself",
        ),
        (
            EHR.replace("fhir-search", "fhir-bulk") + 'level = "group"\n',
            "group_id is required with level = 'group'",
        ),
    ],
)
def test_bad_server_source_config_is_one_line(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, body)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert "s3cr3t-value" not in str(caught.value)


@pytest.mark.parametrize("preset", sorted((Path(__file__).parents[2] / "examples").glob("*.toml")))
def test_vendor_presets_are_valid_configs(preset: Path) -> None:
    settings = load_settings(preset)
    assert settings.sources
    for source in settings.sources:
        assert source.kind in ("fhir-bulk", "fhir-search")
        assert source.auth.type == "smart"  # type: ignore[union-attr]


def test_the_clis_early_read_of_the_store_path_agrees_with_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI puts Prefect's home in the store before Prefect (or the config) loads: it reads
    the store path on its own, and must find the folder `load_settings` names."""
    from flows.cli._prefect import store_path

    folder = tmp_path / "project"
    folder.mkdir()
    config = folder / "twinhub.toml"
    for text, env in [
        ("", {}),
        ('[store]\npath = "data/twin"\n', {}),
        (f'[store]\npath = "{tmp_path / "elsewhere"}"\n', {}),
        ('[store]\npath = "data/twin"\n', {"TWINHUB_STORE__PATH": "env-store"}),
    ]:
        config.write_text(text)
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            assert store_path(config) == load_settings(config).store.path, (text, env)
            m.setenv("TWINHUB_CONFIG", str(config))
            assert store_path(None) == load_settings(None).store.path, (text, env)
