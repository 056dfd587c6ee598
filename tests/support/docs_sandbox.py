"""The docs sandbox: a folder where the docs' commands run as a reader runs them after `make demo`
(in the demo's folder, `twinhub-demo/`, as the demo advises).

It holds the demo's store (`twinhub demo --generate`: generated FHIR and Fitbit data, so
../shared is not needed) and a `twinhub.toml` naming the sources the pages use: the README's
`synthea` (here the generated export), `ehr` and `ehr-bulk` on a real FHIR server (sekmet),
`labs` and `lab-feed` reading the files the labs page writes, `genomes` on a small VCF, and
`fitbit` on the Fitbit Web API stand-in. Blocks run in page order, each page after the ones
before it, in one store.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from tests.support.fault_proxy import free_port
from tests.support.fhir_server import ADMIN_TOKEN, FhirServer
from tests.support.fhir_servers import TYPES
from tests.support.fitbit_server import CLIENT_ID, FitbitServer
from tests.support.snippets import ROOT, Block, commands, program, subcommand, words
from tests.support.vcf import RECORDS, write_vcf

BIN = Path(sys.executable).parent
TIMEOUT = 300.0
LONG_RUNNING = {"listen": ("listening on port", signal.SIGINT), "serve": ("being served", signal.SIGTERM)}
"""Commands that run until stopped: what they print once ready, and how a user stops them."""
DEMO_MODELS = ["ascvd-pce", "resting-hr-baseline", "diabetes-risk"]


@dataclass
class Sandbox:
    root: Path
    env: dict[str, str]
    fitbit: FitbitServer

    def run(self, block: Block) -> None:
        """Run (or write) a block; raise AssertionError saying what went wrong."""
        if block.marker is not None and block.marker.action == "file":
            path = self.root / block.marker.arg
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.text)
            return
        if block.lang == "sql":
            self._check(block, [self.shell(f"twinhub sql {_quote(block.text)}")])
        elif block.lang == "python":
            self._check(block, [self._run([sys.executable, "-c", block.text])])
        else:
            results = [self.command(line) for line in commands(block) if program(line) == "twinhub"]
            self._check(block, results)

    def command(self, line: str) -> subprocess.CompletedProcess[str]:
        """One `twinhub` line, as a user runs it (long-running commands stopped once ready, the
        Fitbit consent given when a connection asks for it)."""
        path = subcommand(words(line))
        if path and path[0] in LONG_RUNNING:
            return self._until_ready(line, *LONG_RUNNING[path[0]])
        if path[:2] == ["wearables", "connect"] and "--code" not in path:
            return self._consenting(line)
        return self.shell(line)

    def shell(self, line: str) -> subprocess.CompletedProcess[str]:
        return self._run(["bash", "-c", line])

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )

    def _check(self, block: Block, results: list[subprocess.CompletedProcess[str]]) -> None:
        failed = [r for r in results if r.returncode != 0]
        if block.failure is not None:
            said = "".join(r.stdout + r.stderr for r in failed)
            assert failed and block.failure in " ".join(said.split()), (
                f"{block.name} should fail saying {block.failure!r}; it said:\n{said}"
            )
            return
        for r in failed:
            shown = r.args[-1] if r.args[0] == "bash" else r.args
            raise AssertionError(f"{block.name}: {shown} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")

    def _until_ready(self, line: str, ready: str, stop: signal.Signals) -> subprocess.CompletedProcess[str]:
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {line}"],
            cwd=self.root,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(proc, lines), daemon=True).start()
        said: list[str] = []
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                got = lines.get(timeout=1)
            except queue.Empty:
                continue
            if got is None or ready in got:
                said.append(got or "")
                break
            said.append(got)
        if proc.poll() is None:
            proc.send_signal(stop)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        output = "".join(said)
        if ready not in output:
            code = code or 1
            output += f"\n(never said {ready!r})"
        if line.split()[-1] == "serve":
            _forget_served()
        return subprocess.CompletedProcess(proc.args, code, output, "")

    def _consenting(self, line: str) -> subprocess.CompletedProcess[str]:
        """`wearables connect`: the patient opens the address it prints, signs in at the
        stand-in, allows access and pastes back the address the browser lands on."""
        proc = subprocess.Popen(
            ["bash", "-c", line],
            cwd=self.root,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdin is not None
        said = []
        for printed in proc.stdout:
            said.append(printed)
            if printed.startswith(self.fitbit.url):
                proc.stdin.write(self.fitbit.authorize(printed.strip(), "USER1") + "\n")
                proc.stdin.flush()
                break
        out, err = proc.communicate(timeout=TIMEOUT)
        return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(said) + out, err)


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)
    lines.put(None)


def _forget_served() -> None:
    """The harness's Prefect server is shared by the session: delete what `twinhub serve`
    registered there (its deployments and the refresh trigger's automation)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for deployment in client.read_deployments():
            if "twinhub" in (deployment.tags or []):
                client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
                client.delete_deployment(deployment.id)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def build(root: Path, prefect_api: str, ehr: FhirServer, fitbit: FitbitServer) -> Sandbox:
    """The demo's store, then the config and the data files the docs' sources name."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "COLUMNS": "200",
    }
    env.pop("TWINHUB_CONFIG", None)
    root.mkdir(parents=True, exist_ok=True)
    demo = subprocess.run(
        [str(BIN / "twinhub"), "demo", "--generate"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert demo.returncode == 0, f"twinhub demo --generate failed:\n{demo.stdout}\n{demo.stderr}"
    root = root / "twinhub-demo"  # where the demo tells its reader to `cd`
    (root / "twinhub.toml").write_text(config(root, ehr, fitbit))
    (root / "keys").mkdir()
    (root / "keys" / "ehr.token").write_text(ADMIN_TOKEN + "\n")
    (root / "genomes").mkdir()
    write_vcf(root / "genomes" / "sample.vcf", RECORDS)
    return Sandbox(root, env, fitbit)


def config(root: Path, ehr: FhirServer, fitbit: FitbitServer) -> str:
    """The sandbox's twinhub.toml: the demo's own config (its store, models and two sources),
    then one source per name the docs' commands use."""
    demo = (root / "twinhub.toml").read_text()
    demo = demo.replace(
        "[models]\n", "[models]\nrefresh_after_sync = false   # `twinhub models run` refreshes\n"
    )
    (patient,) = _first_patients(root, 1)
    since = (datetime.now(UTC) - timedelta(days=2)).date().isoformat()
    types = orjson.dumps(TYPES).decode()
    concept_map = ROOT / "examples" / "lab-codes-conceptmap.json"
    return f"""# The docs sandbox (tests/support/docs_sandbox.py): the demo's config, then the sources the
# docs' commands name.
{demo}
[[sources]]
name = "synthea"
kind = "fhir-ndjson"
path = "sample-export"
schedule = "0 2 * * *"

[[sources]]
name = "ehr"
kind = "fhir-search"
base_url = "{ehr.base_url}"
resource_types = {types}
[sources.auth]
type = "bearer"
token_file = "keys/ehr.token"

[[sources]]
name = "ehr-bulk"
kind = "fhir-bulk"
base_url = "{ehr.base_url}"
resource_types = {types}
poll_seconds = 0.2
[sources.auth]
type = "bearer"
token_file = "keys/ehr.token"

[[sources]]
name = "labs"
kind = "lab-csv"
path = "labs"
patient_system = "urn:twinhub:sample:mrn"
[sources.columns]
id = "result_id"
patient = "mrn"
time = "taken"
code = "loinc"
display = "test"
value = "value"
ucum = "unit"

[[sources]]
name = "lab-feed"
kind = "hl7v2"
path = "inbox/hl7"
port = {free_port()}
concept_map = "{concept_map}"

[[sources]]
name = "genomes"
kind = "vcf"
path = "genomes"
samples = {{ S1 = "{patient}" }}
[sources.reportable]
genes = ["APC"]

[[sources]]
name = "fitbit"
kind = "fitbit"
client_id = "{CLIENT_ID}"
redirect_uri = "http://127.0.0.1:9/fitbit/callback"
api_url = "{fitbit.url}"
authorize_url = "{fitbit.url}/oauth2/authorize"
token_url = "{fitbit.url}/oauth2/token"
since = "{since}"
"""


def _first_patients(root: Path, n: int) -> list[str]:
    from twin_store import connect

    con = connect(root / ".twinhub")
    try:
        return [p for (p,) in con.execute("SELECT id FROM patient ORDER BY id LIMIT ?", [n]).fetchall()]
    finally:
        con.close()
