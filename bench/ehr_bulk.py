"""Bulk `$export` from a real FHIR server (sekmet) landed by twinhub, beside a plain httpx download.

Run by hand (`make bench`), not in CI. Needs sekmet in .venv-sekmet (`make .venv-sekmet`). The
sample export (>= 20,000 resources) is loaded into a private sekmet once; then, interleaved,
`--repeat` times each and every run in its own subprocess (so peak RSS is its own, and imports are
done before the clock starts):

- baseline: kick off `$export`, poll every `POLL_SECONDS`, `client.get(url).content` of every file
  into a temp file, DELETE the job; timed from kick-off to the last byte.
- twinhub: `land_source` of a `fhir-bulk` source into a fresh store, as `twinhub sync` runs it
  (reading the config, opening the store, export, download, check, land, DELETE).

Both include the time sekmet takes to build the export, so the ratio is twinhub's own overhead.
Note: sekmet answers status polls with `Retry-After: 1`, which twinhub honours (over its
`poll_seconds`) and the baseline, polling every POLL_SECONDS regardless, does not; so twinhub
may see the finished export up to a second later. The table splits each run into phases.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
SEKMET_BIN = Path(os.environ.get("TWINHUB_SEKMET") or ROOT / ".venv-sekmet" / "bin" / "sekmet")
TOKEN = "bench-admin-token"
BATCH_SIZE = 2000
POLL_SECONDS = 0.2
SEED = 7
SOURCE = "ehr"
T = TypeVar("T")


# ---- the server ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def sekmet(tmp_dir: Path) -> Iterator[str]:
    """A private sekmet on 127.0.0.1 with its data under `tmp_dir`; yields its FHIR base URL."""
    import httpx

    if not (SEKMET_BIN.is_file() and os.access(SEKMET_BIN, os.X_OK)):
        sys.exit(f"sekmet not found at {SEKMET_BIN}: run `make .venv-sekmet` (or set TWINHUB_SEKMET)")
    port = free_port()
    base = f"http://127.0.0.1:{port}/fhir"
    settings = {
        "host": "127.0.0.1",
        "port": port,
        "base_url": base,
        "data_dir": str(tmp_dir / "data"),
        "simulator": {"enabled": False},
        "log_inbound": False,
        "validation": {"inbound": "off"},
        "server_auth": {"types": ["bearer"], "tokens": [TOKEN]},
    }
    settings_path = tmp_dir / "settings.yaml"
    settings_path.write_text(json.dumps(settings, indent=2))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEKMET_") and k != "PYTHONPATH"}
    env["SEKMET_CONFIG"] = str(settings_path)
    log_path = tmp_dir / "sekmet.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [str(SEKMET_BIN), "serve"],
            cwd=tmp_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches us; the finally below stops sekmet
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
                raise RuntimeError(f"sekmet on port {port} did not start; log tail:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/metadata", timeout=2, trust_env=False).status_code == 200:
                    break
            time.sleep(0.05)
        yield base
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def read_export(folder: Path) -> list[dict[str, Any]]:
    import orjson

    return [
        orjson.loads(line)
        for path in sorted(folder.glob("*.ndjson.gz"))
        for line in gzip.decompress(path.read_bytes()).splitlines()
        if line.strip()
    ]


def load(base: str, resources: list[dict[str, Any]]) -> None:
    """PUTs the resources (keeping their ids) in transaction Bundles of BATCH_SIZE."""
    import httpx
    import orjson

    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=base, headers=headers, timeout=300, trust_env=False) as client:
        for start in range(0, len(resources), BATCH_SIZE):
            chunk = resources[start : start + BATCH_SIZE]
            bundle = {
                "resourceType": "Bundle",
                "type": "transaction",
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
            if response.status_code != 200:
                raise RuntimeError(f"transaction POST: {response.status_code} {response.text[:2000]}")


# ---- the contenders (each in its own subprocess) ----


def baseline(base: str, types: list[str], work: Path, expected: int) -> dict[str, Any]:
    """Plain httpx: kick off, poll at a fixed interval, download every file whole, delete the job."""
    import httpx

    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/fhir+json"}
    with httpx.Client(headers=headers, timeout=300, trust_env=False) as client:
        started = time.perf_counter()
        kickoff = client.get(
            f"{base}/$export", params={"_type": ",".join(types)}, headers={"Prefer": "respond-async"}
        )
        assert kickoff.status_code == 202, f"kick-off: {kickoff.status_code} {kickoff.text[:500]}"
        status_url = kickoff.headers["content-location"]
        while (status := client.get(status_url)).status_code == 202:
            time.sleep(POLL_SECONDS)
        assert status.status_code == 200, f"status: {status.status_code} {status.text[:500]}"
        manifest = status.json()
        ready = time.perf_counter()
        lines = 0
        for i, entry in enumerate(manifest["output"]):
            body = client.get(entry["url"], headers={"Accept": "application/fhir+ndjson"}).content
            (work / f"{i}.ndjson").write_bytes(body)
            lines += body.count(b"\n")
        seconds = time.perf_counter() - started
        client.delete(status_url)
    assert lines == expected, f"baseline downloaded {lines:,} lines, expected {expected:,}"
    return {
        "resources": lines,
        "seconds": seconds,
        "setup": 0.0,
        "export_wait": ready - started,
        "after": seconds - (ready - started),
    }


def timed(marks: dict[str, float], key: str, fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, noting in `marks` when it was first entered and last left, and its total wall time
    (for where twinhub's time goes; the overhead is a few perf_counter calls per call)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        started = time.perf_counter()
        marks.setdefault(f"{key}_first", started)
        try:
            return fn(*args, **kwargs)
        finally:
            marks[f"{key}_last"] = ended = time.perf_counter()
            marks[key] = marks.get(key, 0.0) + ended - started

    return wrapper


def twinhub(base: str, types: list[str], work: Path, expected: int) -> dict[str, Any]:
    from connectors.fhir.bulk import FhirBulkConnector
    from connectors.fhir.client import FhirClient
    from flows.sync import land_source

    marks: dict[str, float] = {}
    FhirBulkConnector._kickoff = timed(marks, "kickoff", FhirBulkConnector._kickoff)  # type: ignore[method-assign]
    FhirBulkConnector._poll = timed(marks, "poll", FhirBulkConnector._poll)  # type: ignore[method-assign]
    FhirClient.download = timed(marks, "download", FhirClient.download)  # type: ignore[method-assign]
    token_file = work / "token"
    token_file.write_text(TOKEN)
    config = work / "twinhub.toml"
    config.write_text(
        f"""[store]
path = "store"

[[sources]]
name = "{SOURCE}"
kind = "fhir-bulk"
base_url = "{base}"
resource_types = {json.dumps(types)}
poll_seconds = {POLL_SECONDS}
auth = {{type = "bearer", token_file = "{token_file}"}}
"""
    )
    started = time.perf_counter()
    report = land_source.fn(str(config), SOURCE)
    ended = time.perf_counter()
    counts = dict(report.counts)
    assert counts.get("inserted") == expected, f"twinhub inserted {counts}, expected {expected:,}"
    return {
        "resources": counts["inserted"],
        "seconds": ended - started,
        "setup": marks["kickoff_first"] - started,
        "export_wait": marks["poll_last"] - marks["kickoff_first"],
        "after": ended - marks["poll_last"],
        "download": marks["download"],
        "counts": counts,
    }


def child(which: str, base: str, types: list[str], expected: int) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"bench-ehr-{which}-"))
    try:
        run = twinhub if which == "twinhub" else baseline
        result = run(base, types, work, expected)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


# ---- the driver ----


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=420)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", choices=["twinhub", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--types", help=argparse.SUPPRESS)
    parser.add_argument("--expected", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.base, args.types.split(","), args.expected)
        return

    from flows.sample_export import write_sample_export

    tmp = Path(tempfile.mkdtemp(prefix="bench-ehr-"))
    try:
        by_type = write_sample_export(tmp / "export", patients=args.patients, seed=SEED)
        total = sum(by_type.values())
        types = sorted(by_type)
        print(f"sample export: {args.patients} patients, {total:,} resources ({len(types)} types)")
        for name, n in by_type.items():
            print(f"  {name:18s} {n:7,d}")
        if total < 20_000:
            print("note: fewer than 20,000 resources; pass a larger --patients")
        (tmp / "server").mkdir()
        with sekmet(tmp / "server") as base:
            started = time.perf_counter()
            load(base, read_export(tmp / "export"))
            print(f"loaded into sekmet in {time.perf_counter() - started:.1f} s ({base})")
            runs = contend(base, types, total, args.repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(runs, total)


def contend(base: str, types: list[str], total: int, repeat: int) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "twinhub": []}
    for _ in range(repeat):
        for which, results in runs.items():  # interleaved, so machine noise hits both alike
            command = [sys.executable, str(Path(__file__).resolve()), "--child", which, "--base", base]
            command += ["--types", ",".join(types), "--expected", str(total)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{which} run failed:\n{done.stderr[-4000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


def report(runs: dict[str, list[dict[str, Any]]], total: int) -> None:
    """Medians; the three phases (each a median of its own) roughly add up to the total."""

    def median(results: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in results))

    secs = {which: median(results, "seconds") for which, results in runs.items()}
    print()
    print(
        f"{'':9s} {'median s':>8s} {'resources/s':>11s} {'peak RSS MB':>11s} | {'setup':>5s} "
        f"{'export':>6s} {'fetch+land':>10s} | runs (s)"
    )
    for which, results in runs.items():
        rss = max(r["peak_rss_mb"] for r in results)
        phases = [median(results, key) for key in ("setup", "export_wait", "after")]
        each = ", ".join(f"{r['seconds']:.2f}" for r in results)
        print(
            f"{which:9s} {secs[which]:8.2f} {total / secs[which]:11,.0f} {rss:11,.0f} | "
            f"{phases[0]:5.2f} {phases[1]:6.2f} {phases[2]:10.2f} | {each}"
        )
    th = runs["twinhub"]
    print(
        "phases: setup = start to kick-off (twinhub: config, fresh store); export = kick-off to "
        "manifest; fetch+land = manifest to done"
    )
    print(
        f"twinhub: {median(th, 'download'):.2f} s of fetch+land in file downloads (median); "
        f"counts {th[-1]['counts']}"
    )
    ratio = secs["twinhub"] / secs["baseline"]
    print(f"ratio twinhub/baseline: time {ratio:.2f}x, resources/s {1 / ratio:.2f}")


if __name__ == "__main__":
    main()
