"""`twinhub status`: what the store holds and how each source is doing, as blocks of text that
read at any width (80 columns too), or `--json`: the same facts as one document for monitoring.
Exits 2 when the last sync or backfill of a configured source failed."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer

from flows.cli._output import err, out, outcome, para, plural, settings

if TYPE_CHECKING:
    import duckdb

    from flows.config import Settings

EXIT_FAILED = 2
"""`status` exits with this when the last sync or backfill of a configured source failed."""
RUNS_SHOWN = 3
REASONS_SHOWN = 5
ERROR_SHOWN = 400
"""Characters of a run's error the text shows (--json has it whole)."""
Facts = dict[str, Any]


def status(
    as_json: Annotated[
        bool, typer.Option("--json", help="The same facts as one JSON document (keys: docs/operations.md)")
    ] = False,
) -> None:
    """Each source (kind, schedule, how far it got, its last runs), quarantine, what waits for
    its patient, rows per table and model refreshes. Exit code 0; 2 when the last sync or
    backfill of some configured source failed; 1 on an error (no store, a bad config)."""
    from twin_store import connect

    cfg = settings()
    facts = gather(cfg, connect(cfg.store.path))
    if as_json:
        text = orjson.dumps(facts, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
        out.print(text, markup=False, highlight=False, soft_wrap=True)
    else:
        render(facts)
    if facts["failed_sources"]:
        raise typer.Exit(EXIT_FAILED)


def gather(cfg: Settings, con: duckdb.DuckDBPyConnection) -> Facts:
    """Everything `status` says, as JSON-able data with stable keys."""
    from twin_store import queries
    from twin_store.runs import COUNTS

    runs: dict[str, list[Facts]] = defaultdict(list)
    for row in _rows(queries.last_runs(con, RUNS_SHOWN), secs="seconds"):
        counts = {c: row.pop(c) for c in COUNTS}
        runs[row.pop("source")].append({**row, "counts": counts})
    marks = {source: (at, mark) for source, at, mark in queries.watermarks(con)}
    configured = {s.name: s for s in cfg.sources}
    names = list(configured) + sorted((set(runs) | set(marks)) - set(configured))
    sources = []
    for name in names:
        found = configured.get(name)
        at, mark = marks.get(name, (None, None))
        progress = None
        if mark is not None:
            progress = progress_of(found.kind, mark) if found else "(its kind is not in the config)"
        sources.append(
            {
                "name": name,
                "kind": found.kind if found else None,
                "schedule": found.schedule if found else None,
                "in_config": found is not None,
                "progress": progress,
                "progress_at": at,
                "runs": runs.get(name, []),
            }
        )
    quarantine: dict[str, Facts] = {}
    for source, reason, lines, source_lines, reasons in queries.quarantine_reasons(
        con, REASONS_SHOWN
    ).fetchall():
        entry = quarantine.setdefault(
            source, {"source": source, "lines": source_lines, "reasons": reasons, "top": []}
        )
        entry["top"].append({"reason": reason, "lines": lines})
    failed = [s for s in queries.failed_sources(con) if s in configured]
    return {
        "store": str(cfg.store.path),
        "healthy": not failed,
        "failed_sources": failed,
        "sources": sources,
        "quarantine": list(quarantine.values()),
        "waiting": _rows(queries.waiting(con), waiting="records"),
        "wearable_days_awaiting_fhir": queries.days_awaiting_fhir(con),
        "tables": dict(queries.table_counts(con).fetchall()),
        "models": _rows(queries.model_runs(con), ok="computed", secs="seconds"),
    }


def render(facts: Facts) -> None:
    """The facts as text: a block per source, then the store's sections."""
    out.print("Sources", style="bold")
    for source in facts["sources"]:
        _source(source)
    total = sum(q["lines"] for q in facts["quarantine"])
    out.print()
    if not total:
        out.print("Quarantine: nothing", style="bold")
    else:
        para(f"Quarantine: {plural(total, 'line')} (each: twinhub quarantine list)", style="bold")
    for q in facts["quarantine"]:
        para(f"{q['source']}: {plural(q['lines'], 'line')}, {plural(q['reasons'], 'reason')}", indent=2)
        for top in q["top"]:
            para(f"{top['lines']:>6,}  {top['reason']}", indent=4, hang=8)
        if more := q["reasons"] - len(q["top"]):
            rest = q["lines"] - sum(t["lines"] for t in q["top"])
            para(
                f"... {more:,} more ({plural(rest, 'line')}): twinhub quarantine list --source {q['source']}",
                indent=4,
            )
    out.print()
    out.print("Waiting for their patient" + ("" if facts["waiting"] else ": nothing"), style="bold")
    for w in facts["waiting"]:
        para(
            f"{w['source']}: {w['records']:,} {w['what']} for {plural(w['patients'], 'patient')} "
            f"(identifier system {w['identifier_system']}), since {_when(w['since'])}",
            indent=2,
        )
    if days := facts["wearable_days_awaiting_fhir"]:
        para(f"{days:,} wearable days wait for their FHIR Observation (the next sync makes them)")
    out.print()
    out.print("Rows per table", style="bold")
    cells = [f"{name:<22}{rows:>10,}" for name, rows in facts["tables"].items()]
    per_line = max(1, (out.width - 2) // 36)
    for at in range(0, len(cells), per_line):
        out.print("  " + "    ".join(cells[at : at + per_line]), markup=False, highlight=False)
    out.print()
    out.print(
        "Twin models" + (" (last 3 refreshes each)" if facts["models"] else ": no refresh yet"), style="bold"
    )
    for m in facts["models"]:
        para(
            f"{m['model']} {m['version']}: {m['scope']} at snapshot {m['input_snapshot_id']}, "
            f"{_when(m['finished_at'])} ({m['trigger']})",
            indent=2,
        )
        if m["scope"] != "unchanged":
            para(
                f"{plural(m['patients'], 'patient')}: {m['computed']:,} computed, {m['refused']:,} refused, "
                f"{m['errors']:,} errors in {m['seconds']:.1f} s",
                indent=4,
            )


def _source(source: Facts) -> None:
    out.print()
    if source["in_config"]:
        schedule = f"schedule {source['schedule']}" if source["schedule"] else "no schedule"
        para(f"{source['name']} ({source['kind']}, {schedule})", style="bold")
    else:
        para(f"{source['name']} (not in the config)", style="bold")
    if source["progress"] is not None:
        para(f"progress: {source['progress']} (as of {_when(source['progress_at'])})", indent=2)
    elif source["runs"]:
        para("progress: none yet; its next sync reads everything", indent=2)
    else:
        para("never synced", indent=2)
    for run in source["runs"]:
        state = run["status"].upper() if run["status"] == "failed" else run["status"]
        took = f", {run['seconds']:.1f} s" if run["seconds"] is not None else ""
        snapshot = f", snapshot {run['snapshot_id']}" if run["snapshot_id"] is not None else ""
        para(
            f"{run['flow']} {state} {_when(run['started_at'])}{took}{snapshot}",
            indent=2,
            style="red" if run["status"] == "failed" else None,
        )
        counts = run["counts"]
        if any(counts.values()):
            para(f"{plural(counts['lines_read'], 'line')} read -> {outcome(counts, run['flow'])}", indent=4)
        if run["error"]:
            error = run["error"]
            if len(error) > ERROR_SHOWN:
                error = error[:ERROR_SHOWN] + "... (twinhub status --json has it whole)"
            para(f"error: {error}", indent=4)


def progress_of(kind: str, watermark: str) -> str:
    """How far a source got, in its kind's words."""
    from connectors.kinds import source_kind

    try:
        return source_kind(kind).describe(orjson.loads(watermark))
    except Exception as e:  # a plugin's describe must not break status
        err.print(f"warning: kind {kind!r} cannot describe its watermark ({type(e).__name__})", markup=False)
        return "(watermark not understood)"


def _rows(rel: duckdb.DuckDBPyRelation, **renamed: str) -> list[Facts]:
    """The relation's rows as dicts, some columns `renamed` (old=new)."""
    names = [renamed.get(c, c) for c in rel.columns]
    return [dict(zip(names, row, strict=True)) for row in rel.fetchall()]


def _when(at: object) -> str:
    return f"{at:%Y-%m-%d %H:%M:%S}" if isinstance(at, datetime) else "-"
