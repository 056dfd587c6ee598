"""`twinhub demo`: the main job on embedded defaults, from an empty machine to answered queries."""

from __future__ import annotations

import shutil
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from connectors.errors import TwinhubError
from flows.cli._output import State, out, print_report, with_progress
from flows.cli._prefect import stoppable, use_home
from flows.cli._results import show
from flows.cli.sources import EXIT_PROBLEMS, problems

SHARED_SYNTHEA = Path("../shared/data/fhir/bulk-ndjson/synthea-r4-617-bundles-derived")
DEMO_MODELS = ("ascvd-pce", "resting-hr-baseline", "diabetes-risk")
MARKER = ".made-by-twinhub-demo"
"""In the demo's folder: the demo made it, so a fresh run may replace what the demo put there."""
MADE = (".twinhub", "sample-export", "sample-fitbit", "twinhub.toml")
"""What the demo puts in its folder (the store, generated data, its config): all it ever deletes."""


def demo(
    folder: Annotated[
        Path, typer.Option("--dir", help="The demo's own folder: its config, store and sample data")
    ] = Path("twinhub-demo"),
    generate: Annotated[
        bool, typer.Option(help="Use generated sample data even if ../shared is there")
    ] = False,
    fresh: Annotated[bool, typer.Option(help="Start from an empty store")] = True,
) -> None:
    """The main job on embedded defaults, in a folder of its own: sync sample FHIR and wearable
    data, refresh the twin models, then query the store."""
    if State.config is not None:
        raise TwinhubError(
            f"the demo writes its own config ({folder / 'twinhub.toml'}); drop --config, or choose "
            "the demo's folder with --dir"
        )
    _claim(folder, fresh=fresh)
    store = folder / ".twinhub"
    use_home(store.resolve() / ".prefect")  # the demo's Prefect state in its own store
    # Prefect reads its home when first imported: only now.
    from flows.sample_export import write_sample_export
    from flows.sync import sync as sync_flow
    from twin_store import connect, queries

    if SHARED_SYNTHEA.is_dir() and not generate:
        name, data = "synthea", SHARED_SYNTHEA.resolve()
        out.print(f"Using the shared Synthea export in {SHARED_SYNTHEA}")
    else:
        name, data = "sample", folder / "sample-export"
        if not data.is_dir():
            written = write_sample_export(data)
            total = sum(written.values())
            out.print(f"Generated a synthetic Bulk Data export: {total:,} resources in {data}")
        data = Path("sample-export")
    config = folder / "twinhub.toml"
    models = ", ".join(f'"{m}"' for m in DEMO_MODELS)
    config.write_text(
        "# Written by `twinhub demo` (each run rewrites it). Paths are relative to this file.\n"
        f'[store]\npath = ".twinhub"\n\n[models]\nenabled = [{models}]\n\n'
        f'[[sources]]\nname = "{name}"\nkind = "fhir-ndjson"\npath = "{data}"\n'
    )
    State.config = config
    started = time.perf_counter()
    reports = []
    with stoppable():
        reports.append(with_progress(name, lambda: sync_flow(name, str(config.resolve()))))
        print_report(reports[-1], store)
        wearables = _demo_wearables(folder, config)
        reports.append(with_progress(wearables, lambda: sync_flow(wearables, str(config.resolve()))))
        print_report(reports[-1], store)
    con = connect(store)
    show(queries.table_counts(con), "Rows per table")
    out.print(f'\nExample query (twinhub sql "..." in {folder}/):')
    out.print(Text(queries.EXAMPLE_QUERY, style="cyan"), soft_wrap=True)  # copied whole, never cut
    show(con.sql(queries.EXAMPLE_QUERY))
    show(
        queries.model_summary(con),
        "Twin models refreshed after the sync (lineage: twinhub models history NAME)",
    )
    out.print(
        f"Done in {time.perf_counter() - started:.1f} s. The demo's config and store are in {folder}/: "
        f"`source .venv/bin/activate; cd {folder}`, then try `twinhub status` and `twinhub sql`.",
        highlight=False,
    )
    # The demo's data is clean: a quarantine here is a bug the user should see, never a quiet pass.
    if lines := [line for report in reports if (line := problems(report, store))]:
        for line in lines:
            out.print(line, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_PROBLEMS)


def _claim(folder: Path, *, fresh: bool) -> None:
    """Make the demo's folder, or take back the one an earlier demo made; refuse any other."""
    if folder.exists() and not (folder / MARKER).exists():
        raise TwinhubError(
            f"{str(folder)!r} exists and was not made by `twinhub demo`; the demo leaves it alone: "
            "choose another folder with --dir"
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("Made by `twinhub demo`; a fresh demo replaces what it put here.\n")
    if fresh:
        for name in MADE:
            path = folder / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def _demo_wearables(root: Path, config: Path) -> str:
    """Give five of the demo's twins a Fitbit (a synthetic Fitabase export of their last two
    weeks) and add it to the demo config as a source; returns its name."""
    from flows.sample_wearables import write_sample_wearables
    from twin_store import connect, queries

    con = connect(root / ".twinhub")
    patients = queries.living_adults(con, born_before=date(1985, 1, 1), limit=5)
    last = queries.last_observation_day(con)
    con.close()
    folder = root / "sample-fitbit"
    if folder.is_dir():  # --no-fresh: the files an earlier run generated
        shutil.rmtree(folder)
    accounts = write_sample_wearables(folder, patients, last_day=last or datetime.now(UTC).date())
    mapping = "".join(f'"{account}" = "{patient}"\n' for account, patient in accounts.items())
    with config.open("a") as fh:
        fh.write(
            f'\n[[sources]]\nname = "fitbit-demo"\nkind = "fitbit-csv"\npath = "sample-fitbit"\n'
            f"[sources.patients]\n{mapping}"
        )
    out.print(f"Generated two weeks of Fitbit data (Fitabase CSVs) for {len(patients)} twins in {folder}")
    return "fitbit-demo"
