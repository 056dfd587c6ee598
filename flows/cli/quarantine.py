"""`twinhub quarantine`: the lines that could not land, and reading them again after a fix."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli._output import out, para, plural, print_report, settings

app = typer.Typer(
    no_args_is_help=True, help="Quarantined lines: list them, and read them again after fixing the cause."
)


@app.command("list")
def quarantine_list(
    source: Annotated[str | None, typer.Option("--source", help="Only this source's lines")] = None,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Only lines whose reason contains this text (any case)")
    ] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many lines", min=1)] = 50,
) -> None:
    """What is quarantined: source, file, line, when and the reason, in file and line order.
    The lines' text stays in the store (the `quarantine` table's `raw`)."""
    from twin_store import connect, queries

    total, lines = queries.quarantined_lines(connect(settings().store.path), source, reason, limit)
    if not total:
        out.print("Nothing quarantined" + (" matches" if source or reason else ""), highlight=False)
        return
    for name, file, line_no, why, when in lines.fetchall():
        para(f"{name}  {file}:{line_no}  (quarantined {when:%Y-%m-%d %H:%M:%S})")
        para(why, indent=4)
    if total > limit:
        para(
            f"... {total - limit:,} more ({total:,} in all): narrow with --source or --reason, "
            "or raise --limit"
        )


@app.command("replay")
def quarantine_replay(source: str) -> None:
    """Read the quarantined lines of SOURCE again, after fixing the cause (its mapping, a check
    twinhub relaxed): those that pass land (or wait for their patient) and leave quarantine; the
    others stay, with their reason as it is now. For sources of FHIR kinds, lab-csv and hl7v2.
    Twin models pick up what landed at their next refresh."""
    from flows.repair import replay

    done = replay(settings(), source)
    if done.run is None:
        out.print(f"{source}: nothing quarantined", highlight=False)
        return
    print_report(done.run)
    left = done.lines - done.stay
    para(
        f"{source}: {plural(done.lines, 'quarantined line')} read again -> {left:,} left quarantine, "
        f"{done.stay:,} stay" + (f" (why: twinhub quarantine list --source {source})" if done.stay else "")
    )
