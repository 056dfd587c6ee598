"""Where the tests find data: the project, the shared sample data (read in place, never copied),
and small files a test writes for itself."""

from __future__ import annotations

from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
SYNTHEA = SHARED / "fhir" / "bulk-ndjson" / "synthea-r4-617-bundles-derived"


def write_ndjson(path: Path, lines: list[dict[str, object] | str]) -> Path:
    """One line per item: dicts as compact JSON, strings verbatim (for broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"".join((item.encode() if isinstance(item, str) else orjson.dumps(item)) + b"\n" for item in lines)
    )
    return path


def write_config(folder: Path, source_path: Path, name: str = "src", **extra: object) -> Path:
    options = "".join(f"{k} = {orjson.dumps(v).decode()}\n" for k, v in extra.items())
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "twinhub.toml"
    config.write_text(
        f'[store]\npath = "{folder / "store"}"\n\n[[sources]]\nname = "{name}"\n'
        f'kind = "fhir-ndjson"\npath = "{source_path}"\n{options}'
    )
    return config
