"""A real FHIR server (sekmet-fhir) in its own process and virtualenv, for testing the EHR connectors.

sekmet lives in .venv-sekmet (`make .venv-sekmet`) so its pins never meet ours. Loading a dataset through
its REST API takes seconds, so the session loads it once (`sekmet_template`) and every test gets a
private server started from a copy of that database (`fhir_server`), which it may modify freely.
Besides SMART Backend Services, every server accepts a static admin bearer token, used by the
helpers here to load and inspect data.

Use from a test module or conftest with `pytest_plugins = ["tests.support.fhir_server"]`
(or `from tests.support.fhir_server import *`).
"""

from __future__ import annotations

import atexit
import contextlib
import gzip
import json
import os
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.support.data import ROOT
from tests.support.fault_proxy import FaultProxy, free_port

__all__ = [
    "ADMIN_TOKEN",
    "SEKMET_BIN",
    "FhirServer",
    "SekmetTemplate",
    "clone_data",
    "fault_proxy",
    "fhir_server",
    "free_port",
    "read_export",
    "require_sekmet",
    "sekmet_template",
    "start_server",
]

SEKMET_BIN = Path(os.environ.get("TWINHUB_SEKMET") or ROOT / ".venv-sekmet" / "bin" / "sekmet")
ADMIN_TOKEN = "admin-test-token"
BATCH_SIZE = 2000
DB_NAME = "sekmet.db"  # sekmet's Settings.database: <data_dir>/sekmet.db
TEMPLATE_PATIENTS = 60
TEMPLATE_SEED = 7

Resource = dict[str, Any]
Key = tuple[str, str]

_running: set[FhirServer] = set()


def require_sekmet() -> Path:
    """The sekmet executable; a missing one skips the test, or fails it where CI demands the server."""
    if SEKMET_BIN.is_file() and os.access(SEKMET_BIN, os.X_OK):
        return SEKMET_BIN
    reason = f"sekmet FHIR server not found at {SEKMET_BIN}: run `make .venv-sekmet` (or set TWINHUB_SEKMET)"
    if os.environ.get("TWINHUB_REQUIRE_SEKMET") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@dataclass(eq=False)
class FhirServer:
    """A running (or stopped) sekmet process with its settings and data under `tmp_dir`."""

    tmp_dir: Path
    port: int
    settings_path: Path
    admin_token: str | None  # None when the server runs without auth
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/fhir"

    @property
    def data_dir(self) -> Path:
        return self.tmp_dir / "data"

    @property
    def database(self) -> Path:
        return self.data_dir / DB_NAME

    @property
    def log_path(self) -> Path:
        return self.tmp_dir / "sekmet.log"

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    def client(self, *, auth_headers: dict[str, str] | None = None, timeout: float = 120) -> httpx.Client:
        """An httpx client on the FHIR base, authenticated with the admin token unless told otherwise."""
        headers = self.admin_headers if auth_headers is None else auth_headers
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, trust_env=False)

    # ---- process ----

    def start(self, timeout: float = 30) -> None:
        """Starts sekmet and waits until /fhir/metadata answers; a failed start raises with the log tail."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEKMET_") and k != "PYTHONPATH"}
        env["SEKMET_CONFIG"] = str(self.settings_path)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(require_sekmet()), "serve"],
                cwd=self.tmp_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in pytest reaches us, and stop() decides what sekmet gets
            )
        _running.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/metadata", timeout=2, trust_env=False).status_code == 200:
                    return
            time.sleep(0.05)
        code = self.process.poll()
        self.stop()
        state = f"exited with {code}" if code is not None else f"not ready after {timeout:.0f} s"
        raise RuntimeError(f"sekmet on port {self.port} {state}; log tail:\n{self.log_tail()}")

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (uvicorn shuts down cleanly and sqlite is checkpointed), SIGKILL if it hangs."""
        proc = self.process
        _running.discard(self)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def restart(self) -> None:
        """Same settings, data directory and port: what a client sees when the EHR is bounced."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # ---- data ----

    def load(
        self,
        resources: Iterable[Resource],
        *,
        auth_headers: dict[str, str] | None = None,
        batch_size: int = BATCH_SIZE,
        bundle_type: str = "batch",
    ) -> int:
        """PUTs the resources (keeping their ids) in Bundles of `batch_size`; every entry must succeed.

        A "transaction" Bundle stores the same thing ~3x faster (sekmet commits once per Bundle, not
        once per entry) but fails as a whole.
        """
        items = list(resources)
        with self.client(auth_headers=auth_headers) as client:
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                bundle = {
                    "resourceType": "Bundle",
                    "type": bundle_type,
                    "entry": [
                        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                        for r in chunk
                    ],
                }
                response = client.post(
                    "",
                    content=orjson.dumps(bundle),
                    headers={"Content-Type": "application/fhir+json", "Prefer": "return=minimal"},
                )
                assert response.status_code == 200, (
                    f"{bundle_type} POST: {response.status_code} {response.text[:2000]}"
                )
                failed = [
                    (f"{r['resourceType']}/{r['id']}", e["response"])
                    for r, e in zip(chunk, response.json()["entry"], strict=True)
                    if not e["response"]["status"].startswith("2")
                ]
                assert not failed, f"{len(failed)} of {len(chunk)} entries failed, first: {failed[:3]}"
        return len(items)

    def put(self, resource: Resource, *, auth_headers: dict[str, str] | None = None) -> Resource:
        """Update-or-create with the resource's own id; returns the stored version (with meta)."""
        with self.client(auth_headers=auth_headers) as client:
            url = f"{resource['resourceType']}/{resource['id']}"
            response = client.put(url, content=orjson.dumps(resource), headers=_JSON)
            response.raise_for_status()
            stored: Resource = response.json()
            return stored

    def delete(
        self, resource_type: str, resource_id: str, *, auth_headers: dict[str, str] | None = None
    ) -> None:
        with self.client(auth_headers=auth_headers) as client:
            client.delete(f"{resource_type}/{resource_id}").raise_for_status()

    def resource_types(self) -> list[str]:
        """Every type the server supports (from its CapabilityStatement)."""
        with self.client() as client:
            statement = client.get("metadata").raise_for_status().json()
        return [r["type"] for rest in statement.get("rest", []) for r in rest.get("resource", [])]

    def dump(
        self, types: Iterable[str] | None = None, *, auth_headers: dict[str, str] | None = None
    ) -> dict[Key, Resource]:
        """Every current (not deleted) resource of `types` (default: all supported types), by search paging.

        All types includes the Basic resources sekmet seeds for its subscription topics.
        """
        out: dict[Key, Resource] = {}
        wanted = list(types) if types is not None else self.resource_types()
        with self.client(auth_headers=auth_headers) as client:
            for resource_type in wanted:
                url: str | None = f"{self.base_url}/{resource_type}?_count=1000"
                while url:
                    bundle = client.get(url).raise_for_status().json()
                    for entry in bundle.get("entry", []):
                        if entry.get("search", {}).get("mode", "match") == "match":
                            r = entry["resource"]
                            out[(r["resourceType"], r["id"])] = r
                    url = next((x["url"] for x in bundle.get("link", []) if x["relation"] == "next"), None)
        return out


_JSON = {"Content-Type": "application/fhir+json"}


def start_server(
    tmp_dir: Path,
    *,
    smart_clients: list[dict[str, Any]] | None = None,
    token_lifetime: int = 3600,
    admin_token: str = ADMIN_TOKEN,
    auth: bool = True,
    port: int | None = None,
    public_url: str | None = None,
) -> FhirServer:
    """Writes settings.yaml into `tmp_dir` and starts sekmet on 127.0.0.1, using `tmp_dir/data`.

    `public_url` (e.g. a FaultProxy's url, with a port chosen in advance by `free_port`) is where sekmet
    says its SMART token endpoint is and the audience it demands in client assertions; links in
    FHIR responses always use the real port.
    """
    require_sekmet()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "base_url": f"http://127.0.0.1:{port}/fhir",
        "data_dir": str(tmp_dir / "data"),
        "simulator": {"enabled": False},
        "log_inbound": False,
        "validation": {"inbound": "off"},
        "server_auth": {
            "types": ["bearer", "smart"] if auth else ["none"],
            "tokens": [admin_token] if auth else [],
            "smart_clients": smart_clients or [],
            "token_lifetime": token_lifetime,
        },
    }
    if public_url:
        settings["public_url"] = public_url
    settings_path = tmp_dir / "settings.yaml"
    settings_path.write_text(json.dumps(settings, indent=2))  # JSON is YAML
    server = FhirServer(tmp_dir, port, settings_path, admin_token if auth else None)
    server.start()
    return server


def clone_data(src: FhirServer, dst_dir: Path) -> Path:
    """Copies src's database into `dst_dir/data` (sqlite backup API: consistent even while src runs)."""
    if not src.database.is_file():
        raise FileNotFoundError(src.database)
    target = dst_dir / "data" / DB_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        contextlib.closing(sqlite3.connect(src.database)) as source,
        contextlib.closing(sqlite3.connect(target)) as dest,
    ):
        source.backup(dest)
    return target.parent


def read_export(folder: Path) -> dict[Key, Resource]:
    """The resources of a folder of `<Type>.ndjson.gz` files, by (type, id)."""
    out: dict[Key, Resource] = {}
    for path in sorted(folder.glob("*.ndjson.gz")):
        for line in gzip.decompress(path.read_bytes()).splitlines():
            if line.strip():
                r = orjson.loads(line)
                out[(r["resourceType"], r["id"])] = r
    return out


@dataclass(frozen=True, eq=False)
class SekmetTemplate:
    """A stopped server holding the generated dataset; `spawn` starts an independent copy of it."""

    server: FhirServer
    resources: dict[Key, Resource]  # as loaded, i.e. without the meta sekmet adds

    @property
    def keys(self) -> frozenset[Key]:
        return frozenset(self.resources)

    @property
    def count(self) -> int:
        return len(self.resources)

    @property
    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(t for t, _ in self.resources).items()))

    @property
    def types(self) -> list[str]:
        return list(self.counts)

    def spawn(self, tmp_dir: Path, **settings: Any) -> FhirServer:
        """A running server on a copy of the template data; `settings` go to `start_server`."""
        clone_data(self.server, tmp_dir)
        return start_server(tmp_dir, **settings)


@pytest.fixture(scope="session")
def sekmet_template(tmp_path_factory: pytest.TempPathFactory) -> SekmetTemplate:
    """The sample export (60 patients, seed 7: ~3,000 resources of 7 types), loaded once per session."""
    from flows.sample_export import write_sample_export

    require_sekmet()
    root = tmp_path_factory.mktemp("sekmet-template")
    write_sample_export(root / "export", patients=TEMPLATE_PATIENTS, seed=TEMPLATE_SEED)
    resources = read_export(root / "export")
    server = start_server(root / "server")
    try:
        server.load(resources.values(), bundle_type="transaction")
    finally:
        server.stop()
    return SekmetTemplate(server, resources)


@pytest.fixture
def fhir_server(sekmet_template: SekmetTemplate, tmp_path: Path) -> Iterator[FhirServer]:
    """A private running server with the template data (admin token: `ADMIN_TOKEN`); stopped afterwards."""
    server = sekmet_template.spawn(tmp_path / "sekmet")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fault_proxy(fhir_server: FhirServer) -> Iterator[FaultProxy]:
    """A FaultProxy in front of `fhir_server`: point the client at `fault_proxy.base_url`."""
    with FaultProxy(fhir_server.root_url) as proxy:
        yield proxy


@atexit.register
def _stop_leftovers() -> None:
    """Never leave a sekmet behind, even if a session dies before its teardown."""
    for server in list(_running):
        server.stop()
