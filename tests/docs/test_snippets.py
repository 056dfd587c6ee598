"""Docs are code: every config and command snippet of the README and the docs pages runs.

Fast (seconds): config blocks load, `twinhub` lines parse against the CLI, `make` targets and
project scripts exist. Slow: every command, query and Python block runs, page by page, in the
docs sandbox (tests/support/docs_sandbox.py) built once per session.
"""

from __future__ import annotations

import ast
import json
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.docs_sandbox import Sandbox, build
from tests.support.fhir_server import SekmetTemplate
from tests.support.fitbit_server import serve
from tests.support.snippets import ROOT, SHELL, Block, all_blocks, commands, program, subcommand, words

BLOCKS = all_blocks()
CONFIGS = [b for b in BLOCKS if b.lang == "toml"]
LINES = [(b, line) for b in BLOCKS if b.lang in SHELL and b.skip_reason is None for line in commands(b)]
IN_SANDBOX = [
    b
    for b in BLOCKS
    if b.lang in ("sql", "python")
    or (b.marker is not None and b.marker.action == "file")
    or (b.lang in SHELL and b.skip_reason is None and any(program(line) == "twinhub" for line in commands(b)))
]


def ids(blocks: list[Block]) -> list[str]:
    return [b.name for b in blocks]


def line_ids(lines: list[tuple[Block, str]]) -> list[str]:
    return [f"{b.name}:{' '.join(words(line)[:3])}" for b, line in lines]


def skip_marked(block: Block) -> None:
    if block.skip_reason is not None:
        pytest.skip(f"{block.name}: {block.skip_reason}")


def test_every_block_says_what_it_is() -> None:
    """A fence names its language; commands live only in blocks that run; markers are known."""
    assert len(BLOCKS) > 50, "the README and docs pages should hold the snippets"
    for block in BLOCKS:
        assert block.lang, f"{block.name}: name the block's language (```bash, ```toml, ```text, ...)"
        if not block.runs and block.skip_reason is None:
            hidden = [
                line for line in block.text.splitlines() if line.startswith(("twinhub ", "$ ", "make "))
            ]
            assert not hidden, f"{block.name}: commands in a ```{block.lang} block are never run: {hidden}"
        if block.marker is not None and block.marker.action == "skip":
            assert len(block.skip_reason or "") > 10, f"{block.name}: say why the block cannot run"
        if block.marker is not None and block.marker.action == "file":
            assert not Path(block.marker.arg).is_absolute() and ".." not in block.marker.arg, block.name
            if block.lang == "json":
                json.loads(block.text)


@pytest.mark.parametrize("block", CONFIGS, ids=ids(CONFIGS))
def test_config_block_loads(block: Block, tmp_path: Path) -> None:
    skip_marked(block)
    from connectors.errors import ConfigError
    from flows.config import load_settings

    data = tomllib.loads(block.text)
    if "entry-points" in data.get("project", {}):  # a package's pyproject.toml: its plugins' entry points
        groups = data["project"]["entry-points"]
        assert set(groups) <= {"twinhub.sources", "twinhub.models"}, block.name
        assert all(":" in target for group in groups.values() for target in group.values()), block.name
        return
    file = tmp_path / "twinhub.toml"
    file.write_text(block.text)
    if block.failure is not None:
        with pytest.raises(ConfigError) as raised:
            load_settings(file)
        assert block.failure in str(raised.value), block.name
        return
    settings = load_settings(file)
    assert settings.sources or "[store]" in block.text or "[models]" in block.text or "[views]" in block.text


@pytest.mark.parametrize(("block", "line"), LINES, ids=line_ids(LINES))
def test_command_line_is_known(block: Block, line: str) -> None:
    """`twinhub` lines parse as the CLI parses them (commands, options, their values); `make`
    targets exist (dry run); project scripts exist and declare the options the line gives."""
    skip_marked(block)
    argv = words(line)
    kind = program(line)
    if kind == "twinhub":
        parse_twinhub(argv)
    elif kind == "make":
        done = subprocess.run(
            ["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, f"{block.name}: {line}: {done.stderr}"
    else:
        script = ROOT / argv[1]
        assert script.is_file(), f"{block.name}: {argv[1]} does not exist"
        unknown = {a.split("=")[0] for a in argv[2:] if a.startswith("--")} - script_options(script)
        assert not unknown, f"{block.name}: {argv[1]} takes no {', '.join(sorted(unknown))}"


def script_options(script: Path) -> set[str]:
    """The options a project script's argparse parser declares (read, not run: benchmarks
    import half the project before they parse)."""
    return {
        arg.value
        for node in ast.walk(ast.parse(script.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_argument"
        for arg in node.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--")
    }


def parse_twinhub(argv: list[str]) -> None:
    """Parse a `twinhub` command line as the CLI would, without running it."""
    import typer

    from flows.cli import app

    command = typer.main.get_command(app)
    ctx = command.make_context("twinhub", argv[1:])
    while hasattr(command, "resolve_command"):
        rest = [*ctx._protected_args, *ctx.args]
        name, command, rest = command.resolve_command(ctx, rest)
        assert command is not None, f"no command {name!r} in {argv}"
        ctx = command.make_context(name, rest, parent=ctx)
    assert subcommand(argv), argv


@pytest.fixture(scope="session")
def docs_sandbox(
    tmp_path_factory: pytest.TempPathFactory, prefect_api: str, sekmet_template: SekmetTemplate
) -> Iterator[Sandbox]:
    ehr = sekmet_template.spawn(tmp_path_factory.mktemp("docs-sekmet"))
    try:
        with serve() as fitbit:
            yield build(tmp_path_factory.mktemp("docs-sandbox"), prefect_api, ehr, fitbit)
    finally:
        ehr.stop()


@pytest.mark.slow
@pytest.mark.parametrize("block", IN_SANDBOX, ids=ids(IN_SANDBOX))
def test_block_runs(block: Block, docs_sandbox: Sandbox) -> None:
    skip_marked(block)
    docs_sandbox.run(block)
