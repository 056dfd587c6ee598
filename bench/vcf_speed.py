"""VCF into genomic_variant: the shared 20,834-record HG00403A.vcf.gz landed as `sync` does,
beside cyvcf2's bare read of the same file in the same run. Run by hand; medians and the ratio.
The unit is VCF records (data lines); `rows` are the genomic_variant rows they make."""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cyvcf2 import VCF

from connectors.genomics.vcf import VcfConnector, VcfSource, spec_warnings
from flows.sync import land_batches
from twin_store import TwinStore

FILE = Path(__file__).resolve().parents[2] / "shared/data/genomics/vcf/vcf2fhir/HG00403A.vcf.gz"


def twinhub() -> tuple[float, int]:
    store = Path(tempfile.mkdtemp(prefix="bench-vcf-"))
    try:
        with TwinStore(store) as st:
            started = time.perf_counter()
            run = st.begin_run("vcf", "sync")
            land_batches(st, run, VcfConnector(VcfSource(name="vcf", kind="vcf", path=FILE)).pull(None))
            st.finish_run(run, "succeeded")
            return time.perf_counter() - started, run.counts["inserted"]
    finally:
        shutil.rmtree(store, ignore_errors=True)


def bare() -> tuple[float, int]:
    started = time.perf_counter()
    records = sum(1 for record in VCF(str(FILE)) if record.genotypes is not None)
    return time.perf_counter() - started, records


def checks() -> float:
    """The spec checks alone (connectors.genomics.vcf_checks), part of the twinhub time above."""
    started = time.perf_counter()
    spec_warnings(FILE)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not FILE.exists():
        sys.exit(f"shared VCF not found at {FILE}")
    ours = [twinhub() for _ in range(args.repeat)]
    theirs = [bare() for _ in range(args.repeat)]
    checking = statistics.median(checks() for _ in range(args.repeat))
    t, b = statistics.median(s for s, _ in ours), statistics.median(s for s, _ in theirs)
    records, rows = theirs[0][1], ours[0][1]
    print(f"twinhub   {records:,} records ({rows:,} rows), median {t:.3f} s = {records / t:,.0f} records/s")
    print(
        f"cyvcf2    {records:,} records read with genotypes, median {b:.3f} s = {records / b:,.0f} records/s"
    )
    print(f"ratio twinhub/cyvcf2 speed: {b / t:.2f}")
    print(f"of which the spec checks: median {checking:.3f} s")


if __name__ == "__main__":
    main()
