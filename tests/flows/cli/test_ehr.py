"""`twinhub sync/backfill` on EHR sources as a user runs them: CLI subprocesses, a real FHIR server
(sekmet) with SMART Backend Services behind a recording proxy, a real store, a real Prefect server."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import httpx
import orjson
import pytest
from joserfc.jwk import ECKey, KeySet, RSAKey

from connectors.errors import StoreError
from flows.sync import land_source
from tests.support.cli import TWINHUB, run_cli
from tests.support.fault_proxy import FaultProxy, free_port
from tests.support.fhir_server import FhirServer, SekmetTemplate
from tests.support.fhir_servers import TYPES, bulk_dump, stored, write_source
from twin_store import connect

CLIENT_SECRET = "client-secret-7f3a9c0e51"


class SmartServer:
    """A sekmet that knows three SMART clients (an RS384 key, an ES384 key, a client secret),
    reached through a proxy that records every credential sent. (One client holding both keys
    would do, but sekmet answers 500 when it tries an RSA key on an ES384 assertion.)"""

    def __init__(self, template: SekmetTemplate, folder: Path) -> None:
        self.rsa = RSAKey.generate_key(2048, parameters={"kid": "rs-1"})
        self.ec = ECKey.generate_key("P-384", parameters={"kid": "es-1"})
        port = free_port()
        self.server: FhirServer = template.spawn(
            folder / "sekmet",
            smart_clients=[
                {"client_id": "twin-rs", "scopes": "system/*.*", "jwks": _public(self.rsa)},
                {"client_id": "twin-es", "scopes": "system/*.*", "jwks": _public(self.ec)},
                {"client_id": "twin-secret", "scopes": "system/*.*", "client_secret": CLIENT_SECRET},
            ],
            token_lifetime=3,
            public_url=f"http://127.0.0.1:{port}",
        )
        self.proxy = FaultProxy(self.server.root_url, port=port)
        self.keys = folder / "keys"
        self.keys.mkdir()
        (self.keys / "rs.pem").write_bytes(self.rsa.as_pem(private=True))
        (self.keys / "es.jwks").write_bytes(orjson.dumps(KeySet([self.ec]).as_dict(private=True)))
        (self.keys / "other.pem").write_bytes(RSAKey.generate_key(2048).as_pem(private=True))

    def close(self) -> None:
        self.proxy.close()
        self.server.stop()

    def expired_token(self) -> str:
        """An access token the server issued, left to expire."""
        response = httpx.post(
            f"{self.server.root_url}/auth/token",
            data={"grant_type": "client_credentials", "scope": "system/*.rs"},
            auth=("twin-secret", CLIENT_SECRET),
        )
        token: str = response.raise_for_status().json()["access_token"]
        time.sleep(4)
        return token


def _public(key: RSAKey | ECKey) -> dict[str, object]:
    return KeySet([key]).as_dict(private=False)


@pytest.fixture
def smart(sekmet_template: SekmetTemplate, tmp_path: Path) -> Iterator[SmartServer]:
    server = SmartServer(sekmet_template, tmp_path)
    try:
        yield server
    finally:
        server.close()


def smart_config(folder: Path, smart: SmartServer, expired_token_file: Path) -> Path:
    base = smart.proxy.base_url
    keys = smart.keys

    def source(name: str, kind: str, auth: str) -> str:
        options = "poll_seconds = 0.2\n" if kind == "fhir-bulk" else ""
        return (
            f'[[sources]]\nname = "{name}"\nkind = "{kind}"\nbase_url = "{base}"\n'
            f"resource_types = {orjson.dumps(TYPES).decode()}\n{options}"
            f"[sources.auth]\n{auth}\n\n"
        )

    smart_auth = 'type = "smart"\nclient_id = "twin-rs"\nscope = "system/*.rs"\n'
    config = folder / "twinhub.toml"
    config.write_text(
        '[store]\npath = "store"\n\n'
        + source("ehr", "fhir-search", smart_auth + f'private_key_file = "{keys / "rs.pem"}"\nkid = "rs-1"')
        + source(
            "ehr-es",
            "fhir-bulk",
            smart_auth.replace("twin-rs", "twin-es")
            + f'private_key_file = "{keys / "es.jwks"}"\nalg = "ES384"',
        )
        + source(
            "ehr-secret",
            "fhir-search",
            'type = "smart"\nclient_id = "twin-secret"\nclient_secret_env = "TWIN_CLIENT_SECRET"',
        )
        + source(
            "wrong-key",
            "fhir-search",
            smart_auth + f'private_key_file = "{keys / "other.pem"}"\nkid = "rs-1"',
        )
        + source(
            "wrong-kid", "fhir-search", smart_auth + f'private_key_file = "{keys / "es.jwks"}"\nkid = "rs-1"'
        )
        + source("expired", "fhir-search", f'type = "bearer"\ntoken_file = "{expired_token_file}"')
    )
    return config


def test_smart_auth_works_fails_in_one_line_and_leaks_no_secret(
    smart: SmartServer, sekmet_template: SekmetTemplate, tmp_path: Path, api_env: dict[str, str]
) -> None:
    expired = tmp_path / "expired-token"
    expired.write_text(smart.expired_token())
    config = smart_config(tmp_path, smart, expired)
    env = {**api_env, "TWIN_CLIENT_SECRET": CLIENT_SECRET}
    outputs = []
    for name in ("ehr", "ehr-es", "ehr-secret"):
        result = run_cli("-v", "--config", str(config), "sync", name, env=env)
        outputs += [result.stdout, result.stderr]
        assert f"sync {name} run" in result.stdout
    assert len(stored(config)) == sekmet_template.count

    failures = {
        "wrong-key": "SMART token request to http://127.0.0.1:",
        "wrong-kid": "auth.kid 'rs-1' is not in the key set (it holds 'es-1'); fix auth.kid",
        "expired": "answered 401 Unauthorized: error: Access token expired",
    }
    for name, message in failures.items():
        result = run_cli("--config", str(config), "sync", name, env=env, check=False)
        outputs += [result.stdout, result.stderr]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1, (name, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)
        assert message in lines[0], (name, lines[0])

    secrets = {CLIENT_SECRET, expired.read_text(), *smart.proxy.credentials}
    for key in (smart.rsa, smart.ec):
        secrets |= {line for line in key.as_pem(private=True).decode().splitlines() if "-----" not in line}
    assert len(smart.proxy.credentials) >= 3  # tokens really crossed the wire, so the hunt is real
    haystacks = [*outputs, *_prefect_logs(), *_store_texts(config.parent / "store")]
    leaks = {s[:12] for s in secrets for text in haystacks if s in text}
    assert not leaks, f"secrets found in logs or store: {leaks}"


def _prefect_logs() -> list[str]:
    from prefect.client.orchestration import get_client

    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(limit=200, offset=len(messages)):
            messages += [log.message for log in page]
    return messages


def _store_texts(store: Path) -> list[str]:
    """Every file's bytes (as text) and every cell of every table and view in the store."""
    texts = [p.read_bytes().decode(errors="replace") for p in store.rglob("*") if p.is_file()]
    con = connect(store)
    tables = con.sql(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = 'twin' UNION "
        "SELECT view_name FROM duckdb_views() WHERE database_name = 'twin'"
    ).fetchall()
    for (table,) in tables:
        texts += [str(row) for row in con.sql(f"SELECT * FROM {table}").fetchall()]
    return texts


@pytest.mark.slow
def test_sigkill_during_bulk_download_resumes_the_same_job(
    fhir_server: FhirServer, fault_proxy: FaultProxy, tmp_path: Path, api_env: dict[str, str]
) -> None:
    config = write_source(tmp_path, fault_proxy.base_url, "fhir-bulk")
    fault_proxy.add_fault("slow", match="Observation.ndjson", delay=30)
    sync = subprocess.Popen(
        [TWINHUB, "--config", str(config), "sync", "ehr"],
        env={**os.environ, **api_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while _files_landed(config) < 4:  # Condition .. MedicationRequest; Observation is downloading
            assert sync.poll() is None and time.monotonic() < deadline, "sync ended before the kill"
            time.sleep(0.2)
        time.sleep(1)
        sync.send_signal(signal.SIGKILL)
        sync.wait(10)
    finally:
        sync.kill()
    status = run_cli("--config", str(config), "status", env=api_env).stdout
    assert "in progress, 4 files landed" in " ".join(status.split())
    seen_before = len(fault_proxy.requests)

    rerun = run_cli("-v", "--config", str(config), "sync", "ehr", env=api_env)
    assert "resuming export job" in rerun.stderr
    again = [r.path for r in fault_proxy.requests[seen_before:]]
    assert not any("$export" in p for p in again), "no new export was started"
    downloads = {p.rsplit("/", 1)[-1] for p in again if "bulk-files" in p}
    # Files already on disk are not fetched again (the two after Observation may be).
    assert "Observation.ndjson" in downloads
    assert downloads <= {"Observation.ndjson", "Patient.ndjson", "Procedure.ndjson"}
    assert stored(config) == bulk_dump(fhir_server.base_url)
    con = connect(config.parent / "store")
    assert con.sql("SELECT status FROM ingest_run ORDER BY started_at").fetchall() == [
        ("interrupted",),
        ("succeeded",),
    ]


def _files_landed(config: Path) -> int:
    try:  # the writer may not have created the store, or its tables, yet
        row = connect(config.parent / "store").sql("SELECT watermark FROM sync_state").fetchone()
    except (StoreError, duckdb.Error):
        return 0
    job = orjson.loads(row[0]).get("job") if row else None
    return sum(f["complete"] for f in job["files"].values()) if job else 0


def test_backfill_walks_the_window_in_steps(
    fhir_server: FhirServer,
    fault_proxy: FaultProxy,
    sekmet_template: SekmetTemplate,
    tmp_path: Path,
    api_env: dict[str, str],
) -> None:
    config = write_source(tmp_path, fault_proxy.base_url, "fhir-search", page_size=1000)
    today = datetime.now(UTC).date()
    since, until = today - timedelta(days=2), today + timedelta(days=1)
    result = run_cli(
        "--config",
        str(config),
        "backfill",
        "ehr",
        "--since",
        str(since),
        "--until",
        str(until),
        "--window",
        "1d",
        env=api_env,
    )
    out = " ".join(result.stdout.split())
    assert "backfill ehr run" in out and f"{sekmet_template.count:,} lines read" in out
    assert "0 outside the window" in out
    first_pages = {p for p in (r.path for r in fault_proxy.requests) if "_lastUpdated=lt" in p}
    assert len({p for p in first_pages if "_offset" not in p}) == 3 * len(TYPES)  # 3 one-day steps a type
    assert len(stored(config)) == sekmet_template.count


def test_a_401_gets_a_fresh_smart_token_and_the_request_again(
    smart: SmartServer, sekmet_template: SekmetTemplate, tmp_path: Path
) -> None:
    config = smart_config(tmp_path, smart, tmp_path / "unused-token")
    smart.proxy.add_fault("401", match="Observation")
    report = land_source.fn(str(config), "ehr")
    seen = smart.proxy.requests
    refused = next(i for i, r in enumerate(seen) if r.outcome == "401")
    assert seen[refused + 1].path.startswith("/auth/token")  # a fresh token at once ...
    assert (seen[refused + 2].path, seen[refused + 2].outcome) == (seen[refused].path, 200)  # ... and again
    assert report.counts["inserted"] == sekmet_template.count
