"""`twinhub init`, `check`, `--version` and `-v` as a new user meets them: real subprocesses."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from connectors.kinds import kind_names
from flows.cli import hoist_verbose
from flows.config import load_settings
from tests.support.cli import run_cli
from tests.support.data import write_config, write_ndjson

EXAMPLE = re.compile(r"^# \[\[sources\]\]\n(?:# .*\n)+", re.MULTILINE)


def test_init_writes_a_starter_that_loads_and_never_overwrites(tmp_path: Path) -> None:
    config = tmp_path / "twinhub.toml"
    written = run_cli("init", str(config))
    assert "wrote" in written.stdout
    settings = load_settings(config)
    assert settings.sources == [] and settings.models.enabled
    config.write_text("# mine\n")
    again = run_cli("init", str(config), check=False)
    assert again.returncode == 1 and "exists" in again.stderr
    assert config.read_text() == "# mine\n"
    run_cli("init", str(config), "--force")
    assert config.read_text().startswith("# twinhub.toml")


def test_every_example_source_of_the_starter_is_a_valid_config(tmp_path: Path) -> None:
    config = tmp_path / "twinhub.toml"
    run_cli("init", str(config))
    starter = config.read_text()
    examples = EXAMPLE.findall(starter)
    assert len(examples) >= 6
    kinds = set()
    for example in examples:
        uncommented = "".join(line[2:] + "\n" for line in example.splitlines())
        config.write_text(starter + "\n" + uncommented)
        (source,) = load_settings(config).sources
        kinds.add(source.kind)
    assert kinds <= set(kind_names()) and len(kinds) == len(examples)
    assert tomllib.loads(starter)["store"]["path"] == ".twinhub"


def test_check_reaches_each_source_and_lands_nothing(tmp_path: Path) -> None:
    write_ndjson(tmp_path / "data" / "Patient.ndjson", [{"resourceType": "Patient", "id": "p1"}])
    config = write_config(tmp_path, tmp_path / "data")
    with config.open("a") as fh:
        fh.write(f'\n[[sources]]\nname = "gone"\nkind = "fhir-ndjson"\npath = "{tmp_path / "nowhere"}"\n')
    one = run_cli("--config", str(config), "check", "src")
    assert one.stdout == "src (fhir-ndjson): ok\n"
    both = run_cli("--config", str(config), "check", check=False)
    assert both.returncode == 1
    assert both.stdout == "src (fhir-ndjson): ok\n"
    assert both.stderr.startswith("gone (fhir-ndjson): source 'gone': path ")
    assert len(both.stderr.splitlines()) == 1
    assert not (tmp_path / "store").exists(), "check must not create or land anything"


def test_version_and_verbose_after_the_command(tmp_path: Path) -> None:
    assert run_cli("--version").stdout == f"twinhub {version('twinhub')}\n"
    write_ndjson(tmp_path / "data" / "Patient.ndjson", [{"resourceType": "Patient", "id": "p1"}])
    config = write_config(tmp_path, tmp_path / "data")
    assert run_cli("--config", str(config), "check", "src", "-v").stdout == "src (fhir-ndjson): ok\n"


@pytest.mark.parametrize(
    ("argv", "hoisted"),
    [
        (["sync", "ehr", "-v"], ["-v", "sync", "ehr"]),
        (["--config", "x.toml", "status", "--verbose"], ["--verbose", "--config", "x.toml", "status"]),
        (["sql", "--", "-v"], ["sql", "--", "-v"]),
    ],
)
def test_verbose_moves_before_the_command(argv: list[str], hoisted: list[str]) -> None:
    assert hoist_verbose(argv) == hoisted
