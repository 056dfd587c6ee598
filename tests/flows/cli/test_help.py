"""`twinhub --help` (and every command's) answers at once: the heavy libraries the work needs
(polars, cyvcf2, pyarrow, duckdb, prefect) are imported only by the commands that do it."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson

from tests.support.cli import TWINHUB

HEAVY = ["cyvcf2", "duckdb", "polars", "prefect", "pyarrow"]

EVERY_HELP = f"""
import sys
import orjson
import typer.main
from flows.cli import app

def paths(command, prefix=()):
    yield prefix
    for name, sub in sorted(getattr(command, "commands", {{}}).items()):
        yield from paths(sub, (*prefix, name))

group = typer.main.get_command(app)
found = {{}}
for path in list(paths(group)):
    try:
        group.main([*path, "--help"], prog_name="twinhub")
    except SystemExit as e:
        assert not e.code, (path, e.code)
    found[" ".join(path)] = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(orjson.dumps(found).decode())
"""


def test_twinhub_help_imports_none_of_the_heavy_libraries() -> None:
    result = subprocess.run(
        [TWINHUB, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "COLUMNS": "100"},
    )
    assert result.returncode == 0, result.stderr
    assert "sync" in result.stdout and "status" in result.stdout
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert {"typer", "rich", "flows"} <= imported, "the import log lists what was imported"
    assert sorted(imported & set(HEAVY)) == []


def test_no_commands_help_imports_the_heavy_libraries() -> None:
    result = subprocess.run(
        [sys.executable, "-c", EVERY_HELP],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert result.returncode == 0, result.stderr
    found: dict[str, list[str]] = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert {"", "sync", "status", "backfill", "wearables connect", "models"} <= set(found)
    assert {path: heavy for path, heavy in found.items() if heavy} == {}
