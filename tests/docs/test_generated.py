"""The generated reference pages (docs/reference/) are what `docs/generate.py` makes from the
code today: a command, option, config key, source kind or view column that changed without its
page failing here."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest

from tests.support.data import ROOT

DOCS = ROOT / "docs"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_pages_are_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    code = generator().main(["--check"])
    assert code == 0, capsys.readouterr().err


def test_every_kind_and_command_has_its_section() -> None:
    from connectors.kinds import kind_names

    kinds = (DOCS / "reference" / "kinds.md").read_text()
    assert all(f"## `{name}`" in kinds for name in kind_names())
    cli = (DOCS / "reference" / "cli.md").read_text()
    for command in (
        "sync",
        "backfill",
        "status",
        "sql",
        "listen",
        "serve",
        "demo",
        "views run",
        "models history",
    ):
        assert f"`twinhub {command}`" in cli, command


def test_field_docstrings_are_read_from_the_source() -> None:
    from connectors.genomics.vcf import VcfSource

    notes = generator().attribute_docstrings(VcfSource)
    assert notes["reportable"] == "Without it no FHIR resources are made, only `genomic_variant` rows."
    assert notes["schedule"].startswith("A cron expression")  # from the base class
    assert "path" not in notes  # a field without a docstring
