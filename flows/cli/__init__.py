"""`twinhub`: sync, backfill, status, sql, serve and the demo. Output code only: the work lives
in the flows and the store."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import duckdb
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from connectors.errors import TwinhubError, safe_url
from connectors.fhir.ndjson import FhirNdjsonSource
from flows.config import Settings, StoreConfig, load_settings
from twin_store import RunReport, connect, standard_views

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
out = Console()
err = Console(stderr=True)
SHARED_SYNTHEA = Path("../shared/data/fhir/bulk-ndjson/synthea-r4-617-bundles-derived")
DEMO_MODELS = ("ascvd-pce", "resting-hr-baseline", "diabetes-risk")


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


class State:
    config: Path | None = None
    verbose: bool = False


@app.callback()
def main_options(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="twinhub.toml (default: $TWINHUB_CONFIG or ./twinhub.toml)"),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress")] = False,
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
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without a server, flows start a temporary one: on a busy machine it needs more than 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")


def settings() -> Settings:
    return load_settings(State.config)


@app.command()
def sync(
    name: str,
    refresh: Annotated[
        bool | None,
        typer.Option(
            "--refresh/--no-refresh",
            help="Refresh the enabled models after landing (default: the config's "
            "models.refresh_after_sync); --no-refresh while `twinhub serve` runs: its trigger refreshes them",
        ),
    ] = None,
) -> None:
    """Land what is new in source NAME."""
    from flows.sync import sync as sync_flow

    _preflight(name)
    _print_report(_with_progress(name, lambda: sync_flow(name, _config_arg(), refresh=refresh)))


@app.command()
def backfill(
    name: str,
    since: Annotated[datetime, typer.Option(help="Start of the window (inclusive), e.g. 2019-01-01")],
    until: Annotated[datetime, typer.Option(help="End of the window (exclusive)")],
    window: Annotated[
        str | None,
        typer.Option(help="FHIR search sources: query this much at a time, e.g. 30d, 12h, 2w"),
    ] = None,
) -> None:
    """Re-pull NAME and re-land what falls in the window, re-deriving unchanged resources."""
    from flows.sync import backfill as backfill_flow

    if since >= until:
        raise TwinhubError(f"--since {since:%Y-%m-%d} must be before --until {until:%Y-%m-%d}")
    step = _duration(window) if window else None
    _preflight(name)
    report = _with_progress(
        name, lambda: backfill_flow(name, _utc(since), _utc(until), _config_arg(), step=step)
    )
    _print_report(report)


@app.command()
def status() -> None:
    """Sources, watermarks, last runs, table counts and quarantine."""
    cfg = settings()
    con = connect(cfg.store.path)
    configured = {s.name: s for s in cfg.sources}
    runs = con.sql(
        """SELECT source, flow, status, started_at, round(epoch(finished_at - started_at), 1) AS secs,
                  lines_read, inserted, updated, unchanged, superseded, quarantined, out_of_window, held,
                  deleted, released, warnings, snapshot_id
           FROM ingest_run QUALIFY row_number() OVER (PARTITION BY source ORDER BY started_at DESC) <= 3
           ORDER BY source, started_at DESC"""
    )
    _show(
        runs,
        "Last runs per source (lines_read + released = inserted + updated + unchanged + superseded"
        " + quarantined + out_of_window + held)",
    )
    marks = con.execute("SELECT source, updated_at, watermark FROM sync_state ORDER BY source").fetchall()
    table = Table(title="Sources and watermarks")
    for col in ("source", "kind", "schedule", "watermark"):
        table.add_column(col)
    seen = set()
    for source, updated_at, watermark in marks:
        seen.add(source)
        done = _watermark_summary(watermark)
        cfg_source = configured.get(source)
        table.add_row(
            source,
            cfg_source.kind if cfg_source else "(not in config)",
            (cfg_source.schedule or "-") if cfg_source else "-",
            f"{done} at {updated_at:%Y-%m-%d %H:%M:%S}",
        )
    for name, s in configured.items():
        if name not in seen:
            table.add_row(name, s.kind, s.schedule or "-", "never synced")
    out.print(table)
    _show(_table_counts(con), "Rows per table")
    _show(
        con.sql(
            """SELECT source, 'FHIR resources' AS what, link_system AS identifier_system,
                      count(*) AS waiting, count(DISTINCT link_value) AS patients, min(held_at) AS since
               FROM held_resource GROUP BY ALL
               UNION ALL
               SELECT source, 'variant calls', split_part(patient_identifier, '|', 1), count(*),
                      count(DISTINCT patient_identifier), min(ingested_at)
               FROM genomic_variant WHERE patient_id IS NULL AND patient_identifier IS NOT NULL
               GROUP BY ALL ORDER BY 1, 2, 3"""
        ),
        "Waiting for their patient (records that name a patient identifier no Patient has yet)",
    )
    _show(
        con.sql(
            "SELECT source, reason, count(*) AS lines FROM quarantine GROUP BY ALL ORDER BY 3 DESC LIMIT 20"
        ),
        "Quarantine (bad lines, kept with their reason)",
    )
    (pending,) = con.sql("SELECT count(*) FROM wearable_daily WHERE fhir_pending").fetchone() or (0,)
    if pending:
        out.print(f"{pending:,} wearable days wait for their FHIR Observation (the next sync makes them)")
    _show(
        con.sql(
            """SELECT model, version, trigger, finished_at, input_snapshot_id, scope, patients, ok, refused,
                      errors, round(seconds, 1) AS secs
               FROM model_run QUALIFY row_number() OVER (PARTITION BY model ORDER BY finished_at DESC) <= 3
               ORDER BY model, finished_at DESC"""
        ),
        "Twin model refreshes (last 3 per model)",
    )


@app.command()
def sql(
    query: str,
    format: Annotated[Format, typer.Option("--format", "-f", help="table, csv or json")] = Format.table,
) -> None:
    """Run QUERY against the store, read-only."""
    con = connect(settings().store.path)
    try:
        rel = con.sql(query)
    except Exception as e:  # DuckDB errors name the problem in the SQL; print them as one line
        raise TwinhubError(f"query failed: {str(e).splitlines()[0]}") from None
    if rel is None:
        return
    if format is Format.table:
        _show(rel)
    elif format is Format.csv:
        sys.stdout.write(rel.pl().write_csv())
    else:
        sys.stdout.write(rel.pl().write_json() + "\n")


views_app = typer.Typer(no_args_is_help=True, help="SQL-on-FHIR v2 ViewDefinitions over the store.")
app.add_typer(views_app, name="views")


class ViewFormat(StrEnum):
    table = "table"
    csv = "csv"
    parquet = "parquet"
    json = "json"


@views_app.command("list")
def views_list() -> None:
    """The standard views and those in the config's views folder."""
    from twin_store.views import load_view, view_files

    table = Table(title="Views (run one: twinhub views run NAME)")
    for col in ("name", "resource", "title", "file"):
        table.add_column(col)
    for name, path in view_files(settings().views.path).items():
        view = load_view(str(path))
        table.add_row(name, str(view.get("resource", "")), str(view.get("title", "")), str(path))
    out.print(table)


@views_app.command("show")
def views_show(
    view: Annotated[str, typer.Argument(help="A view name (see views list) or a JSON file")],
) -> None:
    """Print the DuckDB SQL a ViewDefinition compiles to."""
    from harmonize.sql_on_fhir.view_definition import compile_view
    from twin_store.views import load_view

    sys.stdout.write(compile_view(load_view(view, settings().views.path)).typed_sql + "\n")


@views_app.command("run")
def views_run(
    view: Annotated[str, typer.Argument(help="A view name (see views list) or a JSON file")],
    format: Annotated[ViewFormat, typer.Option("--format", "-f", help="table, csv, parquet or json")] = (
        ViewFormat.table
    ),
    output: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout")
    ] = None,
) -> None:
    """Run a ViewDefinition over the store, read-only."""
    from twin_store.views import load_view, view_relation

    if format is ViewFormat.parquet and output is None:
        raise TwinhubError("--format parquet needs --out FILE.parquet")
    cfg = settings()
    rel = view_relation(connect(cfg.store.path), load_view(view, cfg.views.path))
    try:
        if output is None and format is ViewFormat.table:
            _show(rel)
        elif output is None:
            frame = rel.pl()
            sys.stdout.write(frame.write_csv() if format is ViewFormat.csv else frame.write_json() + "\n")
        elif format is ViewFormat.parquet:
            rel.write_parquet(str(output))
        elif format is ViewFormat.json:
            rel.pl().write_json(output)
        else:
            rel.write_csv(str(output))
    except duckdb.Error as e:  # data-dependent errors, e.g. several values in a single column
        raise TwinhubError(f"view {view!r} failed: {str(e).splitlines()[0]}") from None


@views_app.command("doc")
def views_doc() -> None:
    """Print the schema doc of every view (markdown, one line per column)."""
    from twin_store.views import schema_doc

    sys.stdout.write(schema_doc(settings().views.path))


wearables_app = typer.Typer(no_args_is_help=True, help="Wearable accounts: connect a patient's Fitbit.")
app.add_typer(wearables_app, name="wearables")


@wearables_app.command("connect")
def wearables_connect(
    vendor: Annotated[str, typer.Argument(help="fitbit")],
    patient: Annotated[str, typer.Option("--patient", help="The twin's FHIR Patient id")],
    source: Annotated[
        str | None, typer.Option("--source", help="The fitbit source (needed when there are several)")
    ] = None,
    code: Annotated[
        str | None,
        typer.Option("--code", help="Finish a connection started earlier: the redirect address or its code"),
    ] = None,
) -> None:
    """Connect a patient's Fitbit account (OAuth 2.0 with PKCE): prints the address the patient
    opens, then takes the address Fitbit sends the browser back to (pasted, or later with --code)."""
    from connectors.wearables.fitbit.api import FitbitSource
    from connectors.wearables.fitbit.oauth import (
        FitbitOAuth,
        TokenStore,
        authorization_request,
        code_from_redirect,
    )

    if vendor != "fitbit":
        raise TwinhubError(f"cannot connect {vendor!r}: only fitbit accounts are connected this way")
    cfg = settings()
    fitbits = [s for s in cfg.sources if isinstance(s, FitbitSource) and source in (None, s.name)]
    names = ", ".join(s.name for s in cfg.sources if isinstance(s, FitbitSource)) or "none"
    if len(fitbits) > 1:
        raise TwinhubError(f"there are several fitbit sources ({names}); pick one with --source NAME")
    if not fitbits:
        named = f" named {source!r}" if source else ""
        raise TwinhubError(
            f"no fitbit source{named} in the config (fitbit sources: {names}); add a [[sources]] table "
            'with kind = "fitbit" (see the README)'
        )
    src = fitbits[0]
    store = TokenStore.for_source(src, src.token_path(cfg.store.path))
    store.check_patient(patient)
    later = f"twinhub wearables connect fitbit --patient {patient} --source {src.name} --code CODE"
    if code is None:
        request = authorization_request(src)
        store.save_pending(patient, request, time.time())
        out.print(
            f"Connecting patient {patient} with source {src.name!r}. Open this address in a browser, "
            "sign in to Fitbit as the patient and allow access:",
            highlight=False,
        )
        sys.stdout.write(request.url + "\n")  # whole, never wrapped: it is copied
        out.print("Then paste the address the browser was sent to (or the code in it):", highlight=False)
        sys.stdout.flush()
        code = sys.stdin.readline().strip()
        if not code:
            out.print(f"Nothing pasted; finish within 10 minutes with: {later}", highlight=False)
            return
    else:
        found = store.pending(patient, time.time())
        if found is None:
            raise TwinhubError(
                f"no connection of patient {patient} was started in the last 10 minutes; run the "
                "command without --code to start one"
            )
        request = found
    oauth = FitbitOAuth(src, store)
    try:
        tokens = oauth.connect(patient, request, code_from_redirect(src.name, request, code))
    finally:
        oauth.close()
    out.print(
        f"Connected patient {patient} to Fitbit user {tokens.user_id}; the tokens are kept encrypted "
        f"in {store.path}",
        highlight=False,
    )
    if missing := sorted(set(src.scopes) - tokens.scopes):
        err.print(
            f"[yellow]warning:[/] the patient did not allow {', '.join(missing)}; what needs it is not "
            "pulled (connect again to ask anew)",
            highlight=False,
        )


models_app = typer.Typer(no_args_is_help=True, help="Twin models: list, run now, and their outputs' history.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list() -> None:
    """Installed models (entry points `twinhub.models`), whether enabled, and their last refresh."""
    from flows.refresh import installed, load_model

    cfg = settings()
    last: dict[str, tuple[object, ...]] = {}
    if (cfg.store.path / "catalog.sqlite").exists():
        rows = (
            connect(cfg.store.path)
            .sql(
                """SELECT model, version, finished_at, input_snapshot_id, scope, ok, refused, errors
            FROM model_run
            QUALIFY row_number() OVER (PARTITION BY model ORDER BY finished_at DESC) = 1"""
            )
            .fetchall()
        )
        last = {row[0]: row[1:] for row in rows}
    table = Table(title="Twin models (run one: twinhub models run NAME)")
    for col in (
        "name",
        "version",
        "enabled",
        "scope",
        "reads",
        "last refresh (snapshot: ok/refused/error)",
        "about",
    ):
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
        table.add_row(
            name, model.version, "yes" if name in cfg.models.enabled else "no", model.scope,
            ", ".join(model.reads), refreshed, model.description,
        )  # fmt: skip
    out.print(table)


@models_app.command("run")
def models_run(
    name: str,
    patient: Annotated[
        list[str] | None, typer.Option("--patient", help="Compute this patient now (repeatable)")
    ] = None,
) -> None:
    """Refresh model NAME now (what changed since its last run, or --patient whatever changed)."""
    from flows.refresh import load_model
    from twin_store import TwinStore
    from twin_store.models import refresh

    cfg = settings()
    model = load_model(name)
    with TwinStore(cfg.store.path) as store:
        report = refresh(store, model, trigger="cli", retrain_after=cfg.models.retrain_after.get(name),
                         patients=patient)  # fmt: skip
    c = report.counts
    out.print(
        f"[bold]{name} {report.version}[/]: {report.scope} at snapshot {report.input_snapshot_id} -> "
        f"{c['ok']:,} ok, {c['refused']:,} refused, {c['error']:,} errors in {report.seconds:.1f} s"
        + (" (trained anew)" if report.trained else "")
    )
    if patient:
        _show(
            connect(cfg.store.path).sql(
                f"""SELECT patient_id, version, status, round(value, 4) AS value, reason, input_snapshot_id
                FROM model_output
                WHERE model = {_quoted(name)} AND patient_id IN ({", ".join(_quoted(p) for p in patient)})
                QUALIFY row_number() OVER (PARTITION BY patient_id ORDER BY input_snapshot_id DESC) = 1"""
            )
        )


@models_app.command("history")
def models_history(
    name: str,
    patient: Annotated[str | None, typer.Option("--patient", help="Only this patient")] = None,
    limit: Annotated[int, typer.Option(help="At most this many outputs, newest first")] = 20,
) -> None:
    """Outputs of model NAME with their lineage: the input snapshot (time-travel to it) and the rows used."""
    con = connect(settings().store.path)
    where = f"AND o.patient_id = {_quoted(patient)}" if patient else ""
    rel = con.sql(
        f"""SELECT o.patient_id, o.version, o.status, round(o.value, 4) AS value, o.computed_at,
                   o.input_snapshot_id, s.snapshot_time AS inputs_as_of,
                   coalesce(o.reason, o.outputs) AS detail,
                   len(o.inputs) AS input_rows, o.inputs[1:3] AS first_inputs
            FROM model_output o LEFT JOIN twin.snapshots() s ON s.snapshot_id = o.input_snapshot_id
            WHERE o.model = {_quoted(name)} {where}
            ORDER BY o.computed_at DESC, o.patient_id LIMIT {int(limit)}"""
    )
    _show(
        rel,
        f"{name}: outputs, newest first (each row's inputs: FROM <table> AT (VERSION => input_snapshot_id))",
    )


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@app.command()
def listen(name: str) -> None:
    """Take HL7 v2 messages over MLLP for hl7v2 source NAME until stopped (Ctrl-C)."""
    from flows.listen import listen as listen_flow

    def ready(port: int) -> None:
        out.print(f"listening for HL7 v2 (MLLP) on port {port}; Ctrl-C stops", highlight=False)

    listen_flow(State.config, name, ready=ready)


@app.command()
def serve() -> None:
    """Serve one scheduled sync per source with a `schedule`, and the refresh of the enabled
    models on every sync's event (stops on SIGTERM)."""
    from flows.deployments import serve_sources

    cfg = settings()
    if cfg.models.enabled and cfg.models.refresh_after_sync:
        err.print(
            "note: syncs started outside this serve also refresh the models themselves; give them "
            "--no-refresh, or set refresh_after_sync = false under [models], to leave it to the trigger",
            highlight=False,
            markup=False,
        )
    serve_sources(cfg, _config_arg())


@app.command()
def demo(
    generate: Annotated[
        bool, typer.Option(help="Use generated sample data even if ../shared is there")
    ] = False,
    fresh: Annotated[bool, typer.Option(help="Start from an empty store")] = True,
) -> None:
    """The main job on embedded defaults: sync sample FHIR data, then query it."""
    from flows.sample_export import write_sample_export
    from flows.sync import sync as sync_flow

    store = StoreConfig()
    if fresh and store.path.exists():
        shutil.rmtree(store.path)
    if SHARED_SYNTHEA.is_dir() and not generate:
        source = FhirNdjsonSource(name="synthea", kind="fhir-ndjson", path=SHARED_SYNTHEA)
        out.print(f"Using the shared Synthea export in {SHARED_SYNTHEA}")
    else:
        folder = store.path / "sample-export"
        written = write_sample_export(folder)
        source = FhirNdjsonSource(name="sample", kind="fhir-ndjson", path=folder)
        out.print(f"Generated a synthetic Bulk Data export: {sum(written.values()):,} resources in {folder}")
    demo_config = store.path / "demo.toml"
    store.path.mkdir(parents=True, exist_ok=True)
    models = ", ".join(f'"{m}"' for m in DEMO_MODELS)
    demo_config.write_text(
        f'[store]\npath = "{store.path.resolve()}"\n\n[models]\nenabled = [{models}]\n\n'
        f'[[sources]]\nname = "{source.name}"\nkind = "fhir-ndjson"\npath = "{source.path.resolve()}"\n'
    )
    State.config = demo_config
    started = time.perf_counter()
    report = _with_progress(source.name, lambda: sync_flow(source.name, str(demo_config)))
    _print_report(report)
    wearables = _demo_wearables(store.path, demo_config)
    report = _with_progress(wearables, lambda: sync_flow(wearables, str(demo_config)))
    _print_report(report)
    con = connect(store.path)
    _show(_table_counts(con), "Rows per table")
    example = (
        "SELECT code_display, value_unit, count(*) AS n, round(avg(value_numeric), 1) AS mean\n"
        "FROM lab_result GROUP BY ALL ORDER BY n DESC LIMIT 5"
    )
    out.print(f'\nExample query (twinhub --config {demo_config} sql "..."):\n[cyan]{example}[/]')
    _show(con.sql(example))
    _show(
        con.sql(
            """SELECT model, version, count(DISTINCT patient_id) FILTER (status = 'ok') AS computed,
                      count(DISTINCT patient_id) FILTER (status = 'refused') AS refused,
                      count(DISTINCT patient_id) FILTER (status = 'error') AS errors,
                      round(median(value) FILTER (status = 'ok'), 4) AS median_value,
                      max(input_snapshot_id) AS snapshot
               FROM model_output GROUP BY ALL ORDER BY model"""
        ),
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

    con = connect(root)
    patients = [p for (p,) in con.sql(
        """SELECT id FROM patient WHERE deceased_at IS NULL AND NOT coalesce(deceased, false)
           AND birth_date < '1985-01-01' ORDER BY id LIMIT 5"""
    ).fetchall()]  # fmt: skip
    (last,) = con.sql("SELECT max(CAST(effective AS DATE)) FROM observation").fetchone() or (None,)
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


def _table_counts(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyRelation:
    views = sorted(v.name for v in standard_views())
    tables = ["fhir_resource", *views, "genomic_variant", "wearable_sample", "wearable_daily",
              "wearable_reported", "model_output", "fhir_deletion", "quarantine"]  # fmt: skip
    # A store an earlier twinhub wrote lacks the newer tables until the next sync writes to it.
    present = {name for (name,) in con.sql("SELECT table_name FROM information_schema.tables").fetchall()}
    tables = [t for t in tables if t in present]
    return con.sql(
        " UNION ALL ".join(f"SELECT '{t}' AS table_name, count(*) AS rows FROM {t}" for t in tables)
    )


def _preflight(name: str) -> None:
    """Catch a wrong source name or path here, as one line, before any flow starts."""
    from flows.sync import build_connector

    cfg = settings()
    build_connector(cfg, cfg.source(name)).check()


def _config_arg() -> str | None:
    return str(State.config.resolve()) if State.config else None


def _duration(text: str) -> timedelta:
    units = {"h": "hours", "d": "days", "w": "weeks"}
    number, unit = text[:-1], text[-1:]
    if not number.isdigit() or unit not in units or int(number) == 0:
        raise TwinhubError(f"--window {text!r} is not a duration; use a number and h, d or w, e.g. 30d")
    return timedelta(**{units[unit]: int(number)})


def _utc(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _with_progress(name: str, work: Callable[[], RunReport]) -> RunReport:
    from flows.sync import on_batch, on_progress

    if not State.verbose:
        # A failed run ends in one error line from main(); Prefect would add its tracebacks.
        for logger in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(logger).setLevel(logging.CRITICAL)
    if not out.is_terminal:
        return work()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=out) as bar:
        task = bar.add_task(f"{name}: starting", total=None)
        landed = ""

        def update(run: RunReport) -> None:
            nonlocal landed
            landed = f"{run.counts['lines_read']:,} lines landed"
            bar.update(task, description=f"{name}: {landed}")

        def news(message: str) -> None:
            bar.update(task, description=escape(f"{name}: {message}" + (f" ({landed})" if landed else "")))

        tokens = on_batch.set(update), on_progress.set(news)
        try:
            return work()
        finally:
            on_batch.reset(tokens[0])
            on_progress.reset(tokens[1])


def _print_report(report: RunReport) -> None:
    c = report.counts
    parts = [f"{c['inserted']:,} new", f"{c['updated']:,} updated", f"{c['unchanged']:,} unchanged"]
    if c["superseded"]:
        parts.append(f"{c['superseded']:,} superseded by a newer copy")
    parts.append(f"{c['quarantined']:,} quarantined")
    if report.flow == "backfill":
        parts.append(f"{c['out_of_window']:,} outside the window")
    if c["deleted"]:
        parts.append(f"{c['deleted']:,} deleted")
    out.print(
        f"[bold]{report.flow} {report.source}[/] run {report.run_id}: {c['lines_read']:,} lines read -> "
        f"{', '.join(parts)} in {report.seconds:.1f} s (snapshot {report.snapshot_id})"
    )
    if report.by_type:
        out.print("  by type: " + ", ".join(f"{t} {n:,}" for t, n in sorted(report.by_type.items())))
    if stats := {k: v for k, v in report.stats.items() if v}:
        out.print("  " + ", ".join(f"{k} {v:,}" for k, v in sorted(stats.items())))


def _show(rel: duckdb.DuckDBPyRelation, title: str | None = None) -> None:
    table = Table(title=title)
    for col in rel.columns:
        table.add_column(col)
    for row in rel.fetchall():
        table.add_row(*("" if v is None else str(v) for v in row))
    out.print(table)


def _watermark_summary(watermark_json: str) -> str:
    """How far a source got, in words: files read, types walked, or an export job."""
    import orjson

    mark = orjson.loads(watermark_json)
    if "files" in mark:
        files = mark["files"]
        # Files that land whole per batch (HL7 v2, VCF) keep no line count or `complete` flag.
        done = sum(1 for f in files.values() if f.get("complete", True))
        lines = sum(f.get("lines", f.get("rows", 0)) for f in files.values())
        return f"{done}/{len(files)} files complete" + (f", {lines:,} lines" if lines else "")
    if "types" in mark:
        return "; ".join(
            f"{t} walking (page {st['walk']['page']})"
            if "walk" in st
            else f"{t} up to {st.get('since', '?')}"
            for t, st in mark["types"].items()
        )
    text = f"exported up to {mark['since']}" if mark.get("since") else "no export finished yet"
    if job := mark.get("job"):
        files = job["files"].values()
        text += (
            f"; export job {safe_url(job['status_url'])} in progress, "
            f"{sum(f['complete'] for f in files)} files landed"
        )
    return text


def main() -> None:
    try:
        app()
    except TwinhubError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
