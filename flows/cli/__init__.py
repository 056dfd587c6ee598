"""`twinhub`, the command line: one module per command group, output code only. The work lives
in the flows and the store; queries live in `twin_store.queries`. Commands import what they use
when they run, so `twinhub --help` starts fast."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from connectors.errors import InterruptedRunError, TwinhubError
from flows.cli import (
    _prefect,
    demo,
    models,
    project,
    quarantine,
    query,
    serve,
    sources,
    status,
    views,
    wearables,
)
from flows.cli._output import State, err

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
app.command()(project.init)
app.command()(project.check)
app.command()(sources.sync)
app.command()(sources.backfill)
app.command()(status.status)
app.add_typer(quarantine.app, name="quarantine")
app.command()(sources.reset)
# A query may start with `--` (an SQL comment): not an option.
app.command(context_settings={"ignore_unknown_options": True})(query.sql)
app.command("attach-sql")(query.attach_sql)
app.add_typer(views.app, name="views")
app.add_typer(wearables.app, name="wearables")
app.add_typer(models.app, name="models")
app.command()(sources.listen)
app.command()(serve.serve)
app.command()(demo.demo)


def _version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        typer.echo(f"twinhub {version('twinhub')}")
        raise typer.Exit()


VERBOSE = ("-v", "--verbose")
NO_FLOWS = frozenset({"init", "check", "demo", "attach-sql", "sql", "status", "views"})


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="twinhub.toml (default: $TWINHUB_CONFIG or ./twinhub.toml)"),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log progress (before or after the command)")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit", is_eager=True, callback=_version)
    ] = False,
) -> None:
    """twinhub: EHR, lab, genomic and wearable data in one queryable twin store."""
    State.config = config
    State.verbose = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every URL with its query (search terms, signed file URLs): ours are redacted.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Commands that run no flow leave the store alone (`check` lands nothing, `demo` has its own).
    _prefect.defaults(config, make_home=ctx.invoked_subcommand not in NO_FLOWS)
    # Without a server, flows start a temporary one: on a busy machine it needs more than 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")


def hoist_verbose(argv: list[str]) -> list[str]:
    """`-v` may follow the command (`twinhub sync ehr -v`), as in dbt or dlt; Typer takes global
    options only before it, so they move there. A lone `--` ends the options."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in VERBOSE]
    return flags + [a for a in argv[:end] if a not in VERBOSE] + argv[end:]


INTERRUPTED = 130
"""The exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells expect."""


def main() -> None:
    try:
        app(args=hoist_verbose(sys.argv[1:]), prog_name="twinhub")
    except InterruptedRunError as e:  # Ctrl-C: the run said how far it got
        err.print(str(e), highlight=False, markup=False, soft_wrap=True)
        _interrupted()
    except KeyboardInterrupt:
        err.print("interrupted", highlight=False)
        _interrupted()
    except TwinhubError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)


def _interrupted() -> None:
    """Exit 130 once every exit handler has run (Prefect's, which send the run's end and stop
    the temporary server), but without the interpreter's teardown, which takes seconds on a busy
    machine: registered first (at import), `_exit` runs last."""
    global _exit_code
    _exit_code = INTERRUPTED
    sys.exit(INTERRUPTED)


_exit_code: int | None = None


@atexit.register
def _exit() -> None:
    if _exit_code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_code)


__all__ = ["app", "hoist_verbose", "main"]
