"""How a process opens the store: DuckDB with the DuckLake and SQLite extensions loaded from their
PyPI wheels (nothing is ever downloaded at run time), the DuckLake catalog attached as `twin`, the
run records beside it as the views `run_record` and `ingest_run`; and, for the one writer, its
lock file and its transactions, each a snapshot that names what made it."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

import duckdb
import orjson

from connectors.errors import StoreError
from harmonize.sql_on_fhir.fhirpath import MACROS_SQL
from twin_store.runs import COUNTS, RUNS_FILE

CATALOG = "twin"
EXTENSIONS = ("sqlite_scanner", "ducklake")


def connect(root: Path | str, *, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the store attached as `twin` and selected (read-only default),
    and the views' FHIRPath macros (`fp_*`, temporary) defined."""
    root = Path(root)
    catalog = root / "catalog.sqlite"
    if read_only and not catalog.exists():
        raise StoreError(f"no twin store at {str(root)!r}; run `twinhub sync SOURCE` first")
    root.mkdir(parents=True, exist_ok=True)
    if not read_only:
        # Write-ahead logging: a reader's open query (an analyst's notebook, `twinhub sql`)
        # then never blocks the writer's commit, nor the writer a reader. The mode stays with
        # the file; setting it again is a no-op.
        with contextlib.closing(sqlite3.connect(catalog)) as db:
            db.execute("PRAGMA journal_mode=WAL")
    con = duckdb.connect()
    load_extensions(con)
    con.execute("SET TimeZone = 'UTC'")
    options = "READ_ONLY" if read_only else f"DATA_PATH '{root / 'data'}/'"
    con.execute(f"ATTACH 'ducklake:sqlite:{catalog}' AS {CATALOG} ({options})")
    con.execute(f"USE {CATALOG}")
    # The FHIRPath helpers the compiled views call: with them, a view's query (`twinhub views
    # show`) runs as printed in any session on the store.
    con.execute(MACROS_SQL)
    if (root / RUNS_FILE).exists():  # a store an earlier twinhub wrote has them in the DuckLake
        con.execute(f"ATTACH '{root / RUNS_FILE}' AS twin_runs (TYPE sqlite, READ_ONLY)")
        con.execute(RUN_VIEWS_SQL)
    return con


def attach_statements(root: Path | str) -> str:
    """The SQL that opens the store read-only in any DuckDB client of this version, offline
    (the extensions load from the wheels twinhub installed), as `connect` opens it: with the
    views' macros, so `twinhub views show` SQL runs there too, and the run records."""
    folder = Path(root).resolve()
    catalog = folder / "catalog.sqlite"
    if not catalog.exists():
        raise StoreError(f"no twin store at {str(root)!r}; run `twinhub sync SOURCE` first")
    loads = "".join(f"LOAD {literal(str(extension_path(name)))};\n" for name in EXTENSIONS)
    run_views = ""
    if (folder / RUNS_FILE).exists():
        run_views = (
            f"ATTACH {literal(str(folder / RUNS_FILE))} AS twin_runs (TYPE sqlite, READ_ONLY);\n"
            f"{RUN_VIEWS_SQL.strip()}\n"
        )
    return (
        f"{loads}SET TimeZone = 'UTC';\n"
        f"ATTACH {literal(f'ducklake:sqlite:{catalog}')} AS {CATALOG} (READ_ONLY);\nUSE {CATALOG};\n"
        f"{MACROS_SQL.strip().rstrip(';')};\n{run_views}"
    )


RUN_VIEWS_SQL = f"""
CREATE OR REPLACE TEMP VIEW run_record AS
    SELECT run_id, source, flow, started_at::TIMESTAMPTZ AS started_at,
           finished_at::TIMESTAMPTZ AS finished_at, status, snapshot_id::BIGINT AS snapshot_id, error
    FROM twin_runs.run_record;
CREATE OR REPLACE TEMP VIEW ingest_run AS
    SELECT r.run_id, r.source, r.flow, r.started_at, r.finished_at, r.status,
           {", ".join(f"coalesce(b.{c}, 0)::BIGINT AS {c}" for c in COUNTS)},
           r.snapshot_id, r.error
    FROM run_record r LEFT JOIN (
        SELECT run_id, {", ".join(f"sum({c}) AS {c}" for c in COUNTS)}
        FROM {CATALOG}.ingest_batch GROUP BY run_id
    ) b USING (run_id);
"""
"""Each run's record, and with it the counts of its committed batches (in the DuckLake)."""


def load_extensions(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    for name in EXTENSIONS:
        con.execute(f"LOAD '{extension_path(name)}'")


def extension_path(name: str) -> Path:
    """Where the `duckdb-extension-<name>` wheel put the extension for this DuckDB version."""
    spec = importlib.util.find_spec(f"duckdb_extension_{name}")
    if spec is None or not spec.submodule_search_locations:
        raise StoreError(
            f"DuckDB extension {name!r} is not installed; run `pip install "
            f"duckdb-extension-{name.replace('_', '-')}=={duckdb.__version__}`"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    if not path.exists():
        raise StoreError(
            f"DuckDB extension {name!r} does not match DuckDB {duckdb.__version__} ({path} is "
            f"missing); install duckdb-extension-{name.replace('_', '-')}=={duckdb.__version__}"
        )
    return path


def writer_lock(path: Path, timeout: float) -> IO[str]:
    """Serialize writers: DuckLake writers to one table conflict at commit."""
    fh = path.open("a+")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            return fh
        except BlockingIOError:
            if time.monotonic() >= deadline:
                fh.close()
                raise StoreError(
                    f"another twinhub process is writing to {str(path.parent)!r}; wait for it "
                    "to finish (readers like `twinhub sql` are never blocked)"
                ) from None
            time.sleep(0.2)


AUTHOR = "twinhub"


class Transaction:
    """One DuckLake commit for the statements inside; a rollback when they raise. Its snapshot
    carries `message` (author twinhub) and `extra` (JSON) as its commit message, so
    `twin.snapshots()` says what made each one (`sync SOURCE run ID batch N`, ...). A
    transaction that changes nothing makes no snapshot."""

    def __init__(
        self, con: duckdb.DuckDBPyConnection, message: str, extra: Mapping[str, object] | None = None
    ) -> None:
        self.con, self.message, self.extra = con, message, extra

    def __enter__(self) -> None:
        self.con.execute("BEGIN")
        self.con.execute(
            f"CALL {CATALOG}.set_commit_message(?, ?, extra_info => ?)",
            [AUTHOR, self.message, orjson.dumps(self.extra).decode() if self.extra else None],
        )

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.con.execute("ROLLBACK" if et else "COMMIT")


def one(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[int, ...]:
    """The one row `sql` returns, as integers (counts, flags)."""
    row = con.execute(sql).fetchone()
    assert row is not None
    return tuple(int(v) for v in row)


def literal(text: str) -> str:
    """`text` as a SQL string literal (for statements that take no parameters, like COMMENT)."""
    return "'" + text.replace("'", "''") + "'"
