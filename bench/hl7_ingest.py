"""HL7 v2 ingest rate: the shared lab messages replayed to 10,000+ (each copy a distinct order,
specimen and patient), mapped, every resource validated with the R4B models, and landed as
`sync` does, beside python-hl7's bare parse of the same messages, the runs interleaved in one
invocation. Run by hand; prints medians and the ratio. The machine may be shared: compare the
ratio, and quote the load average printed with it."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import hl7

from connectors.labs.hl7v2 import Hl7v2Connector, Hl7v2Source, split_messages
from flows.sync import harmonized, land_batches
from harmonize.labs.hl7v2 import message_resources
from twin_store import TwinStore

SAMPLES = Path(__file__).resolve().parents[2] / "shared/data/labs/hl7v2"


def replayed(total: int) -> list[str]:
    """Copies of the messages that map, each with its own control id, patient, specimens and orders."""
    good = []
    for file in Hl7v2Connector(Hl7v2Source(name="s", kind="hl7v2", path=SAMPLES)).files():
        for message in split_messages(file):
            try:
                message_resources(message)
                good.append(message)
            except ValueError:
                pass
    return [_distinct(good[i % len(good)], i) for i in range(total)]


def _distinct(text: str, i: int) -> str:
    segments = []
    for segment in text.split("\r"):
        fields = segment.split("|")
        if fields[0] == "MSH" and len(fields) > 9:
            fields[9] = f"R{i}-{fields[9]}"
        if fields[0] == "PID" and len(fields) > 3:
            fields[3] = f"R{i}-{fields[3]}"
        if fields[0] == "SPM" and len(fields) > 2:
            fields[2] = f"R{i}-{fields[2]}"
        if fields[0] == "OBR" and len(fields) > 3:
            fields[2], fields[3] = f"R{i}-{fields[2]}", f"R{i}-{fields[3]}"
        segments.append("|".join(fields))
    return "\r".join(segments)


def run_twinhub(messages: list[str], folder: Path) -> float:
    (folder / "in").mkdir()
    for n in range(0, len(messages), 1000):
        (folder / "in" / f"{n:06d}.hl7").write_text("\r".join(messages[n : n + 1000]) + "\r")
    source = Hl7v2Source(name="lab", kind="hl7v2", path=folder / "in")
    with TwinStore(folder / "store") as store:
        started = time.perf_counter()
        run = store.begin_run("lab", "sync")
        land_batches(store, run, harmonized(source, Hl7v2Connector(source).pull(None)))
        store.finish_run(run, "succeeded")
        seconds = time.perf_counter() - started
    assert run.counts["quarantined"] == 0, run.counts
    # every resource mapped and validated lands (a few samples map two results to one id)
    assert run.counts["inserted"] + run.counts["superseded"] == run.counts["lines_read"], run.counts
    return seconds


def run_baseline(messages: list[str]) -> float:
    started = time.perf_counter()
    for message in messages:
        hl7.parse(message)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not SAMPLES.is_dir():
        sys.exit(f"shared HL7 samples not found at {SAMPLES}")
    messages = replayed(args.messages)
    ours, bare = [], []
    for _ in range(args.repeat):
        folder = Path(tempfile.mkdtemp(prefix="bench-hl7-"))
        try:
            ours.append(run_twinhub(messages, folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        bare.append(run_baseline(messages))
    n = len(messages)
    t, b = statistics.median(ours), statistics.median(bare)
    cores, load = len(os.sched_getaffinity(0)), os.getloadavg()[0]
    print(f"{n:,} messages, median of {args.repeat} runs, {cores} cores, load average {load:.1f} at the end")
    print(f"twinhub (read, map, validate, land)  {t:6.2f} s = {n / t:6,.0f} messages/s")
    print(f"baseline: python-hl7 parse only      {b:6.2f} s = {n / b:6,.0f} messages/s")
    print(f"ratio twinhub/baseline speed: {b / t:.2f}")


if __name__ == "__main__":
    main()
