"""`twinhub models`: the installed twin models, refreshing one now, and its outputs' lineage."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from connectors.errors import TwinhubError
from flows.cli._output import out, settings
from flows.cli._results import show

app = typer.Typer(no_args_is_help=True, help="Twin models: list, run now, and their outputs' history.")


@app.command("list")
def models_list() -> None:
    """Installed models (entry points `twinhub.models`), whether enabled, and their last refresh."""
    from flows.refresh import installed, load_model
    from twin_store import connect, queries

    cfg = settings()
    last = (
        queries.last_model_runs(connect(cfg.store.path))
        if (cfg.store.path / "catalog.sqlite").exists()
        else {}
    )
    table = Table(title="Twin models (run one: twinhub models run NAME)")
    columns = (
        "name",
        "version",
        "enabled",
        "scope",
        "reads",
        "last refresh (snapshot: ok/refused/error)",
        "about",
    )
    for col in columns:
        table.add_column(col)
    for name in installed():
        try:
            model = load_model(name)
        except TwinhubError as e:
            table.add_row(name, "", "", "", "", "", f"[red]{escape(str(e))}[/]")
            continue
        seen = last.get(name)
        refreshed = (
            f"{seen[1]:%Y-%m-%d %H:%M} ({seen[2]}: {seen[4]}/{seen[5]}/{seen[6]})" if seen else "never"
        )
        enabled = "yes" if name in cfg.models.enabled else "no"
        reads = ", ".join(model.reads)
        table.add_row(name, model.version, enabled, model.scope, reads, refreshed, model.description)
    out.print(table)


@app.command("run")
def models_run(
    name: str,
    patient: Annotated[
        list[str] | None, typer.Option("--patient", help="Compute this patient now (repeatable)")
    ] = None,
) -> None:
    """Refresh model NAME now (what changed since its last run, or --patient whatever changed)."""
    from flows.refresh import load_model
    from twin_store import TwinStore, connect, queries
    from twin_store.models import refresh

    cfg = settings()
    _installed(name)
    model = load_model(name)
    retrain_after = cfg.models.retrain_after.get(name)
    with TwinStore(cfg.store.path) as store:
        report = refresh(store, model, trigger="cli", retrain_after=retrain_after, patients=patient)
    c = report.counts
    out.print(
        f"[bold]{name} {report.version}[/]: {report.scope} at snapshot {report.input_snapshot_id} -> "
        f"{c['ok']:,} ok, {c['refused']:,} refused, {c['error']:,} errors in {report.seconds:.1f} s"
        + (" (trained anew)" if report.trained else "")
    )
    if patient:
        show(queries.latest_outputs(connect(cfg.store.path), name, patient))


@app.command("history")
def models_history(
    name: str,
    patient: Annotated[str | None, typer.Option("--patient", help="Only this patient")] = None,
    limit: Annotated[int, typer.Option(help="At most this many outputs, newest first")] = 20,
) -> None:
    """Outputs of model NAME with their lineage: the input snapshot (time-travel to it) and the rows used."""
    from twin_store import connect, queries

    con = connect(settings().store.path)
    if not queries.has_outputs(con, name):
        _installed(name)  # an uninstalled model's outputs stay readable
    show(
        queries.output_history(con, name, patient, limit),
        f"{name}: outputs, newest first (each row's inputs: FROM <table> AT (VERSION => input_snapshot_id))",
    )


def _installed(name: str) -> None:
    """A model name the user typed: one line naming the installed ones when it is none of them."""
    from flows.refresh import installed

    names = sorted(installed())
    if name not in names:
        raise TwinhubError(f"no model {name!r}; installed: {', '.join(names) or 'none'}")
