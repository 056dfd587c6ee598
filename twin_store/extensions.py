"""Load DuckDB extensions from their PyPI wheels, so nothing is ever downloaded at run time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import duckdb

from connectors.errors import StoreError

REQUIRED = ("sqlite_scanner", "ducklake")


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


def load_extensions(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    for name in REQUIRED:
        con.execute(f"LOAD '{extension_path(name)}'")
