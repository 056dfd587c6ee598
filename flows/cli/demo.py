"""`twinhub demo`: the main job on embedded defaults, from an empty machine to answered queries."""

from __future__ import annotations

import shutil
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated

import typer

from flows.cli._output import State, out, print_report, show, with_progress
from flows.cli._prefect import stoppable

SHARED_SYNTHEA = Path("../shared/data/fhir/bulk-ndjson/synthea-r4-617-bundles-derived")
DEMO_MODELS = ("ascvd-pce", "resting-hr-baseline", "diabetes-risk")


def demo(
    generate: Annotated[
        bool, typer.Option(help="Use generated sample data even if ../shared is there")
    ] = False,
    fresh: Annotated[bool, typer.Option(help="Start from an empty store")] = True,
) -> None:
    """The main job on embedded defaults: sync sample FHIR data, then query it."""
    from flows.config import StoreConfig
    from flows.sample_export import write_sample_export
    from flows.sync import sync as sync_flow
    from twin_store import connect, queries

    store = StoreConfig()
    if fresh and store.path.exists():
        shutil.rmtree(store.path)
    if SHARED_SYNTHEA.is_dir() and not generate:
        name, folder = "synthea", SHARED_SYNTHEA
        out.print(f"Using the shared Synthea export in {SHARED_SYNTHEA}")
    else:
        name, folder = "sample", store.path / "sample-export"
        written = write_sample_export(folder)
        out.print(f"Generated a synthetic Bulk Data export: {sum(written.values()):,} resources in {folder}")
    demo_config = store.path / "demo.toml"
    store.path.mkdir(parents=True, exist_ok=True)
    models = ", ".join(f'"{m}"' for m in DEMO_MODELS)
    demo_config.write_text(
        f'[store]\npath = "{store.path.resolve()}"\n\n[models]\nenabled = [{models}]\n\n'
        f'[[sources]]\nname = "{name}"\nkind = "fhir-ndjson"\npath = "{folder.resolve()}"\n'
    )
    State.config = demo_config
    started = time.perf_counter()
    with stoppable():
        print_report(with_progress(name, lambda: sync_flow(name, str(demo_config))))
        wearables = _demo_wearables(store.path, demo_config)
        print_report(with_progress(wearables, lambda: sync_flow(wearables, str(demo_config))))
    con = connect(store.path)
    show(queries.table_counts(con), "Rows per table")
    out.print(
        f'\nExample query (twinhub --config {demo_config} sql "..."):\n[cyan]{queries.EXAMPLE_QUERY}[/]'
    )
    show(con.sql(queries.EXAMPLE_QUERY))
    show(
        queries.model_summary(con),
        f"Twin models refreshed after the sync (lineage: twinhub --config {demo_config} models history NAME)",
    )
    out.print(
        f"Done in {time.perf_counter() - started:.1f} s. The store is in {store.path}/ ; "
        "try `twinhub status` and `twinhub sql`."
    )


def _demo_wearables(root: Path, config: Path) -> str:
    """Give five of the demo's twins a Fitbit (a synthetic Fitabase export of their last two
    weeks) and add it to the demo config as a source; returns its name."""
    from flows.sample_wearables import write_sample_wearables
    from twin_store import connect, queries

    con = connect(root)
    patients = queries.living_adults(con, born_before=date(1985, 1, 1), limit=5)
    last = queries.last_observation_day(con)
    con.close()
    folder = root / "sample-fitbit"
    accounts = write_sample_wearables(folder, patients, last_day=last or datetime.now(UTC).date())
    mapping = "".join(f'"{account}" = "{patient}"\n' for account, patient in accounts.items())
    with config.open("a") as fh:
        fh.write(
            f'\n[[sources]]\nname = "fitbit-demo"\nkind = "fitbit-csv"\npath = "{folder.resolve()}"\n'
            f"[sources.patients]\n{mapping}"
        )
    out.print(f"Generated two weeks of Fitbit data (Fitabase CSVs) for {len(patients)} twins in {folder}")
    return "fitbit-demo"
