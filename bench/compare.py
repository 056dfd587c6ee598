"""Run benchmarks on this checkout and on an earlier commit, interleaved, in one invocation.

    .venv/bin/python bench/compare.py --against 699b5f6 land_bulk hl7_ingest --rounds 3

The earlier commit gets a git worktree beside this checkout (`../twinhub-<commit>`, so its
benchmarks find ../shared as ours do) and a virtualenv of its own, made once. Each round runs
every benchmark on both trees, alternating which goes first; each run is the benchmark script as
it stands in that tree, with its own defaults. From each run's output we take twinhub's rate and
its baseline's (the lines that start with the contender's name), and print per benchmark the
median rates of the rounds, this tree's / the other's, and each tree's rate / its baseline. The
machine may be shared: compare the ratios.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("land_bulk", "ehr_bulk", "hl7_ingest", "vcf_speed", "wearable_ingest", "view_speed")
RATE = re.compile(r"^(\w+)\b.*?([\d,]+) \w+/s", re.M)
"""A contender's line: its name first, then its rate (`= 84,012 resources/s`)."""
TABLE_RATE = re.compile(r"^(\w+)\s+[\d.]+\s+([\d,]+)\s", re.M)
"""ehr_bulk prints a table instead: name, median seconds, resources/s, ..."""


def worktree(commit: str) -> Path:
    """The earlier commit's checkout and virtualenv, made on first use."""
    git = ["git", "-C", str(ROOT)]
    short = subprocess.check_output([*git, "rev-parse", "--short", commit], text=True).strip()
    tree = ROOT.parent / f"twinhub-{short}"
    if not tree.exists():
        subprocess.run([*git, "worktree", "add", "--detach", str(tree), short], check=True)
    python = tree / ".venv" / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(tree / ".venv")], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-e", f"{tree}[dev]"], check=True)
    sekmet = tree / ".venv-sekmet"
    if not sekmet.exists() and (ROOT / ".venv-sekmet").exists():
        sekmet.symlink_to((ROOT / ".venv-sekmet").resolve())
    return tree


def run(tree: Path, benchmark: str) -> tuple[float, float]:
    """twinhub's rate and its baseline's, as the benchmark in `tree` prints them."""
    script = tree / "bench" / f"{benchmark}.py"
    done = subprocess.run(
        [str(tree / ".venv" / "bin" / "python"), str(script)], cwd=tree, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{script} failed:\n{done.stdout}\n{done.stderr}")
    pattern = TABLE_RATE if benchmark == "ehr_bulk" else RATE
    rates = {name: float(number.replace(",", "")) for name, number in pattern.findall(done.stdout)}
    others = [rate for name, rate in rates.items() if name != "twinhub"]
    if "twinhub" not in rates or not others:
        raise SystemExit(f"{script} printed no rates to compare:\n{done.stdout}")
    return rates["twinhub"], others[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("benchmarks", nargs="*", help=f"some of {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--against", required=True, help="the earlier commit (a hash, tag or branch)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if unknown := set(args.benchmarks) - set(BENCHMARKS):
        parser.error(f"no benchmark {', '.join(sorted(unknown))}; there are {', '.join(BENCHMARKS)}")
    args.benchmarks = args.benchmarks or list(BENCHMARKS)
    trees = {"this": ROOT, args.against: worktree(args.against)}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for n in range(args.rounds):
        for benchmark in args.benchmarks:
            order = list(trees.items()) if n % 2 == 0 else list(reversed(trees.items()))
            for name, tree in order:
                ours, baseline = run(tree, benchmark)
                results.setdefault((benchmark, name), []).append((ours, baseline))
                print(f"round {n + 1} {benchmark:16s} {name:10s} {ours:12,.0f}/s", flush=True)
    print(f"\nmedians of {args.rounds} rounds (each round: the script's own repeats and medians)")
    heads = ("this", args.against, "this/that", "this/base", "that/base")
    print(f"{'benchmark':16s} " + " ".join(f"{h:>14s}" for h in heads))
    for benchmark in args.benchmarks:
        this, that = results[benchmark, "this"], results[benchmark, args.against]
        ours, theirs = statistics.median(r for r, _ in this), statistics.median(r for r, _ in that)
        our_ratio = statistics.median(r / b for r, b in this)
        their_ratio = statistics.median(r / b for r, b in that)
        figures = (
            f"{ours:,.0f}",
            f"{theirs:,.0f}",
            f"{ours / theirs:.3f}",
            f"{our_ratio:.2f}",
            f"{their_ratio:.2f}",
        )
        print(f"{benchmark:16s} " + " ".join(f"{f:>14s}" for f in figures))


if __name__ == "__main__":
    main()
