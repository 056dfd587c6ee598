"""Land the shared Synthea Bulk export and, in the same invocation, a plain DuckDB baseline.

Run by hand (`make bench`), not in CI. Each contender runs in its own subprocess (so peak RSS is
its own), `--repeat` times; we print medians and the ratio. twinhub is timed inside the process
after start-up: pull -> check -> land raw + the 11 standard view tables, batch by batch, as `sync` does.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYNTHEA = Path(__file__).resolve().parents[2] / "shared/data/fhir/bulk-ndjson/synthea-r4-617-bundles-derived"


def twinhub(store: Path) -> dict[str, float]:
    from connectors.fhir.ndjson import FhirNdjsonConnector, FhirNdjsonSource
    from flows.sync import land_batches
    from twin_store import TwinStore

    source = FhirNdjsonSource(name="synthea", kind="fhir-ndjson", path=SYNTHEA)
    with TwinStore(store) as st:
        started = time.perf_counter()
        run = st.begin_run("synthea", "sync")
        land_batches(st, run, FhirNdjsonConnector(source).pull(None))
        st.finish_run(run, "succeeded")
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        again = st.begin_run("synthea", "sync")
        land_batches(st, again, FhirNdjsonConnector(source).pull(st.watermark("synthea")))
        st.finish_run(again, "succeeded")
        resync = time.perf_counter() - started
    return {"resources": run.counts["inserted"], "seconds": seconds, "resync_seconds": resync}


def baseline(store: Path) -> dict[str, float]:
    """Plain DuckDB: read_json of the same files into one table, no checks, no view tables."""
    import duckdb

    con = duckdb.connect(str(store / "baseline.duckdb"))
    started = time.perf_counter()
    con.execute(
        f"CREATE TABLE raw AS SELECT * FROM read_json('{SYNTHEA}/*.ndjson.gz', "
        "format='newline_delimited', records=false, columns={'json': 'JSON'})"
    )
    seconds = time.perf_counter() - started
    (n,) = con.execute("SELECT count(*) FROM raw").fetchone() or (0,)
    return {"resources": n, "seconds": seconds}


def child(which: str) -> None:
    store = Path(tempfile.mkdtemp(prefix=f"bench-{which}-"))
    try:
        result = twinhub(store) if which == "twinhub" else baseline(store)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", choices=["twinhub", "baseline"])
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if not SYNTHEA.is_dir():
        sys.exit(f"shared Synthea export not found at {SYNTHEA}")
    runs: dict[str, list[dict[str, float]]] = {"twinhub": [], "baseline": []}
    for _ in range(args.repeat):
        for which in runs:  # interleaved, so machine noise hits both alike
            out = subprocess.run(
                [sys.executable, __file__, "--child", which],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs[which].append(json.loads(out.strip().splitlines()[-1]))
    rates = {}
    for which, results in runs.items():
        secs = statistics.median(r["seconds"] for r in results)
        rates[which] = results[0]["resources"] / secs
        rss = max(r["peak_rss_mb"] for r in results)
        extra = ""
        each = ", ".join(f"{r['seconds']:.2f}" for r in results)
        if which == "twinhub":
            resync = statistics.median(r["resync_seconds"] for r in results)
            extra = f", re-sync {resync:.2f} s"
        print(
            f"{which:9s} {results[0]['resources']:,.0f} resources, median {secs:.2f} s "
            f"= {rates[which]:,.0f} resources/s, peak RSS {rss:,.0f} MB{extra} "
            f"(runs: {each})"
        )
    print(f"ratio twinhub/baseline: {rates['twinhub'] / rates['baseline']:.2f}")


if __name__ == "__main__":
    main()
