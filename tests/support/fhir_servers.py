"""Syncing from the sekmet FHIR server in tests: a source config for it, and what it and the store hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
from xxhash import xxh3_64_intdigest

from tests.support.fhir_server import ADMIN_TOKEN
from twin_store import connect

TYPES = ["Condition", "Encounter", "Immunization", "MedicationRequest", "Observation", "Patient", "Procedure"]


def write_source(folder: Path, base_url: str, kind: str, **options: Any) -> Path:
    """A twinhub.toml with one source `ehr` of `kind` on `base_url` (admin token from a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "token"
    token.write_text(ADMIN_TOKEN + "\n")
    auth = options.pop("auth", {"type": "bearer", "token_file": str(token)})
    options = {"resource_types": TYPES, "backoff_seconds": 0.05, **options}
    if kind == "fhir-bulk":
        options.setdefault("poll_seconds", 0.2)
        options.pop("page_size", None)
    lines = [f"{k} = {orjson.dumps(v).decode()}" for k, v in options.items()]
    auth_lines = [f"{k} = {orjson.dumps(v).decode()}" for k, v in auth.items()]
    config = folder / "twinhub.toml"
    config.write_text(
        f'[store]\npath = "store"\n\n[[sources]]\nname = "ehr"\nkind = "{kind}"\nbase_url = "{base_url}"\n'
        + "\n".join(lines)
        + "\n\n[sources.auth]\n"
        + "\n".join(auth_lines)
        + "\n"
    )
    return config


def stored(config: Path) -> dict[Key, int]:
    """(type, id) -> content hash of every resource in the store."""
    con = connect(config.parent / "store")
    rows = con.sql("SELECT resource_type, id, content_hash FROM fhir_resource").fetchall()
    return {(t, i): h for t, i, h in rows}


def bulk_dump(base_url: str) -> dict[Key, int]:
    """A plain $export and download loop with httpx: the server's NDJSON lines, hashed."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(headers=headers, timeout=60) as http:
        kickoff = http.get(
            f"{base_url}/$export", params={"_type": ",".join(TYPES)}, headers={"Prefer": "respond-async"}
        )
        status = kickoff.headers["content-location"]
        while (poll := http.get(status)).status_code == 202:
            pass
        out = {}
        for entry in poll.json()["output"]:
            for line in http.get(entry["url"]).content.splitlines():
                resource = orjson.loads(line)
                out[(resource["resourceType"], resource["id"])] = xxh3_64_intdigest(line)
        http.delete(status)
    return out


Key = tuple[str, str]
