"""A source kind that only a test defines, installed as any other package's would be: a module
with `KIND = SourceKind(...)` and a dist-info folder registering it under `twinhub.sources`, put
on the path of `twinhub` subprocesses. Config, sync and status find it by name alone: adding a
kind edits no file of twinhub."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from twin_store import connect

KIND_MODULE = '''
"""A source kind for the tests: `patients` Patient resources, in two batches."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Literal

import orjson

from connectors.base import Batch, Watermark, Window, records_from
from connectors.kinds import Context, SourceConfig, SourceKind


class TestKindSource(SourceConfig):
    kind: Literal["testkind"]
    patients: int = 4


class TestKindConnector:
    def __init__(self, source: TestKindSource) -> None:
        self.name = source.name
        self.source = source
        self.stats: Counter[str] = Counter()

    def check(self) -> None:
        pass

    def pull(self, since: Watermark | None, window: Window | None = None) -> Iterator[Batch]:
        ids = [f"tk-{i}" for i in range(self.source.patients)]
        done = (since or {}).get("batches", 0)
        for n, chunk in enumerate((ids[: len(ids) // 2], ids[len(ids) // 2 :]), start=1):
            if n <= done:
                continue
            rows = [
                (f"testkind:batch{n}", line, orjson.dumps({"resourceType": "Patient", "id": i}).decode())
                for line, i in enumerate(chunk, start=1)
            ]
            yield Batch(records=records_from(rows), watermark={"batches": n, "last": chunk[-1]})


def build(source: TestKindSource, context: Context) -> TestKindConnector:
    return TestKindConnector(source)


def describe(watermark: Watermark) -> str:
    return f"testkind landed {watermark['batches']} of 2 batches, the last ending at {watermark['last']}"


KIND = SourceKind(
    kind="testkind",
    modality="ehr",
    summary="Patients made up by the tests",
    config=TestKindSource,
    build=build,
    records="fhir",
    describe=describe,
)
'''


@pytest.fixture
def plugin_path(tmp_path: Path) -> dict[str, str]:
    """A folder holding the test kind as an installed distribution, as PYTHONPATH for subprocesses."""
    site = tmp_path / "site"
    (site / "twinhub_testkind-0.1.dist-info").mkdir(parents=True)
    (site / "twinhub_testkind.py").write_text(KIND_MODULE)
    (site / "twinhub_testkind-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: twinhub-testkind\nVersion: 0.1\n"
    )
    (site / "twinhub_testkind-0.1.dist-info" / "entry_points.txt").write_text(
        "[twinhub.sources]\ntestkind = twinhub_testkind:KIND\n"
    )
    return {"PYTHONPATH": str(site), "COLUMNS": "250"}


def write_config(folder: Path, kind: str = "testkind") -> Path:
    config = folder / "twinhub.toml"
    config.write_text(
        textwrap.dedent(f"""\
            [store]
            path = "store"

            [[sources]]
            name = "made-up"
            kind = "{kind}"
            patients = 6
            """)
    )
    return config


@pytest.mark.slow
def test_a_kind_from_another_package_syncs_and_shows_in_status(
    tmp_path: Path, plugin_path: dict[str, str], api_env: dict[str, str]
) -> None:
    config = write_config(tmp_path)
    run_cli("--config", str(config), "sync", "made-up", env={**api_env, **plugin_path})
    con = connect(tmp_path / "store")
    landed = con.sql("SELECT resource_type, id FROM fhir_resource ORDER BY id").fetchall()
    assert landed == [("Patient", f"tk-{i}") for i in range(6)]
    assert con.sql("SELECT source, lines_read, inserted FROM ingest_run").fetchall() == [("made-up", 6, 6)]

    status = run_cli("--config", str(config), "status", env={**plugin_path, "COLUMNS": "200"}).stdout
    block = status[status.index("made-up (testkind") :]
    assert "progress: testkind landed 2 of 2 batches, the last ending at tk-5" in block.splitlines()[1]


def test_a_misspelled_kind_lists_the_installed_plugin_kind(
    tmp_path: Path, plugin_path: dict[str, str]
) -> None:
    config = write_config(tmp_path, kind="testkinf")
    result = run_cli("--config", str(config), "status", env=plugin_path, check=False)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: config sources[0]: unknown kind 'testkinf'; use one of: ")
    known = line.split("use one of: ")[1].split(", ")
    assert "testkind" in known and "fhir-ndjson" in known and "fitbit" in known

    # The kind is known through its registration alone: without it on the path, it is not.
    result = run_cli("--config", str(write_config(tmp_path)), "status", check=False)
    assert result.returncode == 1
    assert "unknown kind 'testkind'" in result.stderr
