"""Fault injection: one damaged file among good ones, for every file kind. The readable part of
the damaged file lands, the damage is quarantined with its line and reason, every good file
lands whole, every line read is landed or quarantined, a replaced file lands on the next sync,
and the CLI ends such a sync with exit code 3 and one line naming the file.

A kind joins by adding a `FileKind` (how to write n good records, where they land) and its
damage recipes to `RECIPES`."""

from __future__ import annotations

import gzip
import io
import random
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from connectors.kinds import SourceConfig
from flows.config import load_settings
from flows.sync import build_connector, harmonized, land_batches
from tests.support.cli import run_cli
from tests.support.hl7v2 import MESSAGE
from tests.support.kinds import HEART_RATE_SCHEMA
from tests.support.vcf import HEADER as VCF_HEADER
from twin_store import RunReport, TwinStore, connect

PREFIXES = ["g1-", "g2-", "g", "cut", "bad", "odd", "h", "new"]
"""The ids of each file's records start with one of these."""
GOOD = 300
"""Records in each good file (and in the damaged one before its damage)."""
SECRET = "Zebedee"
"""A name in the damaged file's text: never in what the CLI prints."""


@dataclass(frozen=True, kw_only=True)
class FileKind:
    kind: str
    suffix: str
    header_lines: int
    """Lines before the first record."""
    options: str
    """The source's TOML keys besides name, kind and path."""
    lines: Callable[[str, int], list[bytes]]
    """The text of `n` records (a file's header first) with ids starting `prefix`."""
    landed: str
    """SQL counting the records landed whose ids start with $prefix (one per file)."""
    member: str = ""
    """What a problem's file adds to the file's path: the member of a zip it is in."""

    def write(self, path: Path, prefix: str, n: int = GOOD) -> Path:
        data = b"".join(line + b"\n" for line in self.lines(prefix, n))
        path.parent.mkdir(parents=True, exist_ok=True)  # a suffix may name a subfolder
        if path.name.endswith(".zip"):  # an Apple Health export: its export.xml, deflated
            packed = io.BytesIO()
            with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.writestr("apple_health_export/export.xml", data)
            data = packed.getvalue()
        path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
        return path


def unpacked(cut: bytes) -> bytes:
    """What a gzip file (or a zip of one deflated member) cut short still holds."""
    if cut.startswith(b"PK"):
        name, extra = int.from_bytes(cut[26:28], "little"), int.from_bytes(cut[28:30], "little")
        return zlib.decompressobj(wbits=-15).decompress(cut[30 + name + extra :])
    return zlib.decompressobj(wbits=31).decompress(cut)


def _ndjson(prefix: str, n: int) -> list[bytes]:
    return [orjson.dumps({"resourceType": "Patient", "id": f"{prefix}{i}"}) for i in range(n)]


def _csv(prefix: str, n: int) -> list[bytes]:
    rows = [f"{prefix}{i},p1,718-7,2024-01-01T10:00:00Z,{10 + i % 7},g/dL".encode() for i in range(n)]
    return [b"id,patient,loinc,when,value,unit", *rows]


def _vcf(prefix: str, n: int) -> list[bytes]:
    start = 10_000_000 * (1 + PREFIXES.index(prefix))  # a call at the same place replaces one
    records = [
        f"chr5\t{start + 10 * i}\t{prefix}{i}\tT\tA\t50\tPASS\t.\tGT:PS\t0/1:.\t0/0:." for i in range(n)
    ]
    return [line.encode() for line in [*VCF_HEADER.splitlines(), *records]]


def _hl7v2(prefix: str, n: int) -> list[bytes]:
    """One ORU^R01 a line (segments end with CR), with MSH-10 and the order numbers `prefix`i."""
    return [
        MESSAGE.replace("MSG001", f"{prefix}{i}").replace("PL1|FL1", f"{prefix}{i}|{prefix}{i}").encode()
        for i in range(n)
    ]


def _fitabase(prefix: str, n: int) -> list[bytes]:
    """Hourly steps of one account, `prefix`1 (its Patient "fa-<prefix>1")."""
    rows = [f"{prefix}1,3/{1 + i // 24}/2016 {i % 12 or 12}:00:00 {'AP'[i // 12 % 2]}M,{i}" for i in range(n)]
    return [line.encode() for line in ["Id,ActivityHour,StepTotal", *rows]]


DAY = 86_400
DAY0 = 19_723  # 2024-01-01: the records of the k-th prefix are on day DAY0 + k, a minute apart


def _moment(prefix: str, i: int, form: str) -> str:
    return datetime.fromtimestamp((DAY0 + PREFIXES.index(prefix) + 1) * DAY + 60 * i, UTC).strftime(form)


def _omh(prefix: str, n: int) -> list[bytes]:
    schema = {"namespace": "omh", "name": "heart-rate", "version": "1.0"}
    return [
        orjson.dumps(
            {
                "header": {
                    "id": f"{prefix}{i}",
                    "creation_date_time": "2024-05-02T00:00:00Z",
                    "schema_id": schema,
                },
                "body": {
                    "heart_rate": {"value": 60 + i % 40, "unit": "beats/min"},
                    "effective_time_frame": {"date_time": _moment(prefix, i, "%Y-%m-%dT%H:%M:%SZ")},
                },
            }
        )
        for i in range(n)
    ]


def _apple(prefix: str, n: int) -> list[bytes]:
    head = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<HealthData locale="en_GB">',
        ' <ExportDate value="2024-06-10 09:00:00 +0000"/>',
    ]
    records = [
        f' <Record type="HKQuantityTypeIdentifierHeartRate" sourceName="Watch" unit="count/min" '
        f'creationDate="{at}" startDate="{at}" endDate="{at}" value="{60 + i % 40}"/>'
        for i in range(n)
        for at in [_moment(prefix, i, "%Y-%m-%d %H:%M:%S +0000")]
    ]
    return [line.encode() for line in [*head, *records, "</HealthData>"]]


ON_ITS_DAY = (
    "SELECT count(*) FROM wearable_sample WHERE epoch(start_time)::BIGINT // 86400 = "
    f"{DAY0 + 1} + list_position({PREFIXES}, $prefix) - 1"
)
"""Samples of the prefix's day (wearables have no ids of their own)."""
COLUMNS = (
    'columns = { id = "id", patient = "patient", code = "loinc", time = "when", value = "value", '
    'ucum = "unit" }'
)
KINDS = {
    "fhir-ndjson": FileKind(
        kind="fhir-ndjson",
        suffix=".ndjson.gz",
        header_lines=0,
        options="",
        lines=_ndjson,
        landed="SELECT count(*) FROM fhir_resource WHERE starts_with(id, $prefix)",
    ),
    "lab-csv": FileKind(
        kind="lab-csv",
        suffix=".csv.gz",
        header_lines=1,
        options=COLUMNS,
        lines=_csv,
        landed='SELECT count(*) FROM fhir_resource WHERE contains(resource, \'"value":"\' || $prefix)',
    ),
    "vcf": FileKind(
        kind="vcf",
        suffix=".vcf.gz",
        header_lines=len(VCF_HEADER.splitlines()),
        options='samples = { S1 = "p1" }',
        lines=_vcf,
        landed="SELECT count(*) FROM genomic_variant WHERE starts_with(variant_id, $prefix)",
    ),
    "hl7v2": FileKind(
        kind="hl7v2",
        suffix=".hl7.gz",
        header_lines=0,
        options="",
        lines=_hl7v2,
        landed=(
            "SELECT count(*) FROM fhir_resource WHERE resource_type = 'DiagnosticReport' "
            'AND contains(resource, \'"value":"\' || $prefix)'
        ),
    ),
    "fitbit-csv": FileKind(
        kind="fitbit-csv",
        suffix="/hourlySteps_merged.csv.gz",  # the file's name says what it holds: one a folder
        header_lines=1,
        options='patient_prefix = "fa-"\ntimezone = "UTC"',
        lines=_fitabase,
        landed="SELECT count(*) FROM wearable_sample WHERE contains(patient_id, 'fa-' || $prefix || '1')",
    ),
    "openmhealth": FileKind(
        kind="openmhealth",
        suffix=".ndjson.gz",
        header_lines=0,
        options='schemas = "{schemas}"\npatient = "p1"',  # write_config writes the schema
        lines=_omh,
        landed=ON_ITS_DAY,
    ),
    "apple-health": FileKind(
        kind="apple-health",
        suffix=".zip",
        header_lines=3,
        options='patient = "p1"',
        lines=_apple,
        landed=ON_ITS_DAY,
        member="!/apple_health_export/export.xml",
    ),
}


@dataclass(frozen=True, kw_only=True)
class Damage:
    path: Path
    prefix: str
    """The start of the ids of its records."""
    records: int
    """Records the file holds (or held before its damage)."""
    landed: int | None
    """Records that land; None: a prefix of the file does, and the line after it is quarantined."""
    quarantined: list[int] | None


def truncated(kind: FileKind, folder: Path) -> Damage:
    """A gzip file cut in the middle: every line the cut leaves whole lands."""
    path = kind.write(folder / f"cut{kind.suffix}", "cut")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    whole = unpacked(data[: len(data) // 2]).count(b"\n")
    return Damage(
        path=path,
        prefix="cut",
        records=whole - kind.header_lines,
        landed=whole - kind.header_lines,
        quarantined=[whole + 1],
    )


def corrupt(kind: FileKind, folder: Path) -> Damage:
    """Gzip data damaged in the middle: what comes before the damage lands."""
    path = kind.write(folder / f"bad{kind.suffix}", "bad", n=20_000)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    return Damage(path=path, prefix="bad", records=20_000, landed=None, quarantined=None)


def not_gzip(kind: FileKind, folder: Path) -> Damage:
    path = folder / f"noise{kind.suffix}"
    path.write_bytes(random.Random(1).randbytes(3000))
    return Damage(path=path, prefix="noise", records=0, landed=0, quarantined=[1])


def bad_line(line: bytes) -> Callable[[FileKind, Path], Damage]:
    """A plain file with `line` in place of its fifth record."""

    def recipe(kind: FileKind, folder: Path) -> Damage:
        lines = kind.lines("odd", GOOD)
        lines[kind.header_lines + 4] = line
        path = folder / f"odd{kind.suffix.removesuffix('.gz')}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"".join(x + b"\n" for x in lines))
        return Damage(
            path=path, prefix="odd", records=GOOD, landed=GOOD - 1, quarantined=[kind.header_lines + 5]
        )

    return recipe


def bad_header(kind: FileKind, folder: Path) -> Damage:
    path = folder / f"head{kind.suffix}"
    path.write_bytes(
        gzip.compress(b"".join(x + b"\n" for x in [b"##fileformat=VCFv9", *kind.lines("h", 3)[1:]]))
    )
    return Damage(path=path, prefix="h", records=0, landed=0, quarantined=[1])


def recipe(kind: str, name: str, damage: Callable[[FileKind, Path], Damage], *, fast: bool = False) -> object:
    """A case of the test below: truncation runs in the fast suite for each kind, the rest is slow."""
    return pytest.param(kind, damage, id=f"{kind}: {name}", marks=() if fast else pytest.mark.slow)


RECIPES = [
    recipe("fhir-ndjson", "truncated gzip", truncated, fast=True),
    recipe("fhir-ndjson", "corrupt gzip", corrupt),
    recipe("fhir-ndjson", "not gzip", not_gzip),
    recipe("lab-csv", "truncated gzip", truncated, fast=True),
    recipe("lab-csv", "corrupt gzip", corrupt),
    recipe("lab-csv", "ragged row", bad_line(f"x,p1,718-7,2024-01-01T10:00:00Z,1,g/dL,{SECRET}".encode())),
    recipe(
        "lab-csv", "field over 131,072", bad_line(f'x,p1,718-7,2024-01-01,"{SECRET * 20_000}",g/dL'.encode())
    ),
    recipe(
        "lab-csv",
        "not UTF-8",
        bad_line(f"x,p1,718-7,2024-01-01T10:00:00Z,1,\xb5mol/L {SECRET}".encode("latin-1")),
    ),
    recipe("lab-csv", "bad quote", bad_line(f'x,p1,"718-7"{SECRET},2024-01-01T10:00:00Z,1,g/dL'.encode())),
    recipe("vcf", "truncated gzip", truncated, fast=True),
    recipe("vcf", "corrupt gzip", corrupt),
    recipe("vcf", "malformed line", bad_line(f"chr5\t1045\t{SECRET}".encode())),
    recipe("vcf", "POS 1e3", bad_line(b"chr5\t1e3\tnan\tT\tA\t50\tPASS\t.\tGT:PS\t0/1:.\t0/0:.")),
    recipe("vcf", "POS -3", bad_line(b"chr5\t-3\tminus\tT\tA\t50\tPASS\t.\tGT:PS\t0/1:.\t0/0:."), fast=True),
    recipe("vcf", "bad header", bad_header),
    recipe("hl7v2", "truncated gzip", truncated),
    recipe(
        "hl7v2", "garbled message", bad_line(f"MSH|^~\\&|LAB|{SECRET}\x00\rPID|1||\rOBX|1|NM|||".encode())
    ),
    recipe("fitbit-csv", "truncated gzip", truncated),
    recipe("fitbit-csv", "not UTF-8", bad_line(b"odd1,3/1/2016 4:00:00 AM,\xb5" + SECRET.encode())),
    recipe("fitbit-csv", "missing value", bad_line(b"odd1,3/1/2016 4:00:00 AM,")),
    recipe("openmhealth", "truncated gzip", truncated),
    recipe(
        "openmhealth",
        "impossible heart rate",
        bad_line(_omh("odd", 5)[4].replace(b'"value":64', b'"value":6400')),
    ),
    recipe("apple-health", "truncated zip", truncated),
]


def write_config(folder: Path, kind: FileKind, data: Path) -> Path:
    config = folder / "twinhub.toml"
    schemas = folder / "schema"
    (schemas / "omh").mkdir(parents=True, exist_ok=True)
    (schemas / "omh" / "heart-rate-1.0.json").write_bytes(orjson.dumps(HEART_RATE_SCHEMA))
    config.write_text(
        f'[store]\npath = "{folder / "store"}"\n\n[[sources]]\nname = "src"\nkind = "{kind.kind}"\n'
        f'path = "{data}"\n{kind.options.replace("{schemas}", str(schemas))}\n'
    )
    return config


def sync(config: Path) -> RunReport:
    """A sync as the flow runs it, in this process (the CLI adds only its output and exit code)."""
    settings = load_settings(config)
    source: SourceConfig = settings.source("src")
    with TwinStore(settings.store.path) as store:
        run = store.begin_run("src", "sync")
        land_batches(
            store, run, harmonized(source, build_connector(settings, source).pull(store.watermark("src")))
        )
        return store.finish_run(run, "succeeded")


def landed(kind: FileKind, store: Path, prefix: str) -> int:
    (n,) = connect(store).execute(kind.landed, {"prefix": prefix}).fetchone() or (0,)
    return int(n)


def read_equals_landed_plus_quarantined(report: RunReport) -> None:
    c = report.counts
    outcomes = ("inserted", "updated", "unchanged", "superseded", "quarantined", "out_of_window", "held")
    assert c["lines_read"] == sum(c[k] for k in outcomes), dict(c)


@pytest.mark.parametrize(("kind_name", "damage"), RECIPES)
def test_a_damaged_file_lands_its_readable_part_beside_the_good_files(
    tmp_path: Path, kind_name: str, damage: Callable[[FileKind, Path], Damage]
) -> None:
    kind = KINDS[kind_name]
    data = tmp_path / "data"
    data.mkdir()
    for n in (1, 2):
        kind.write(data / f"good{n}{kind.suffix}", f"g{n}-")
    bad = damage(kind, data)
    store = tmp_path / "store"
    report = sync(write_config(tmp_path, kind, data))

    read_equals_landed_plus_quarantined(report)
    assert [landed(kind, store, f"g{n}-") for n in (1, 2)] == [GOOD, GOOD], "the good files land whole"
    quarantine = (
        connect(store).sql("SELECT file, line_no, reason FROM quarantine ORDER BY line_no").fetchall()
    )
    assert {file for file, _, _ in quarantine} == {f"{bad.path}{kind.member}"}
    assert all(reason for _, _, reason in quarantine)
    lines = [line for _, line, _ in quarantine]
    got = landed(kind, store, bad.prefix)
    if bad.quarantined is None:  # what comes before the damage lands (or is quarantined: noise)
        damage = lines[-1]
        assert quarantine[-1][2].startswith(f"file damaged after line {damage - 1:,}")
        assert 0 < got <= damage - 1 - kind.header_lines - (len(lines) - 1)
    else:
        assert lines == bad.quarantined
        assert got == bad.landed
    assert report.counts["quarantined"] == len(quarantine)

    kind.write(bad.path, "new", n=7)  # replaced: it lands on the next sync, whole
    again = sync(tmp_path / "twinhub.toml")
    read_equals_landed_plus_quarantined(again)
    assert again.counts["quarantined"] == 0
    assert landed(kind, store, "new") == 7


def test_a_file_that_vanishes_or_cannot_be_read_after_listing_is_one_problem(tmp_path: Path) -> None:
    kind = KINDS["fhir-ndjson"]
    data = tmp_path / "data"
    data.mkdir()
    gone = kind.write(data / f"gone{kind.suffix}", "x")
    kept = kind.write(data / f"kept{kind.suffix}", "k")
    settings = load_settings(write_config(tmp_path, kind, data))
    source = settings.source("src")
    (data / f"dir{kind.suffix}").mkdir()
    for remove in (False, True):
        connector = build_connector(settings, source)
        listed = [*connector.files(), data / f"dir{kind.suffix}"]  # a folder: open() refuses it
        if remove:
            gone.unlink()
        connector.files = lambda listed=listed: listed  # type: ignore[method-assign]
        batches = list(connector.pull(None))
        problems = [p for b in batches for p in b.problems.to_pylist()]
        assert sorted((Path(p["file"]).name, p["line_no"]) for p in problems) == [
            (f"dir{kind.suffix}", 0),
            *([(f"gone{kind.suffix}", 0)] if remove else []),
        ]
        assert all(p["reason"].startswith("file cannot be read (") for p in problems)
        assert sum(b.records.num_rows for b in batches) == GOOD * (1 if remove else 2)
        mark = batches[-1].watermark["files"]
        assert str(kept) in mark and str(data / f"dir{kind.suffix}") not in mark, "looked at again next time"


@pytest.mark.parametrize(
    "kind_name",
    [
        "fhir-ndjson",
        pytest.param("lab-csv", marks=pytest.mark.slow),
        pytest.param("vcf", marks=pytest.mark.slow),
        pytest.param("fitbit-csv", marks=pytest.mark.slow),
        pytest.param("openmhealth", marks=pytest.mark.slow),
    ],
)
def test_the_cli_ends_a_sync_that_quarantined_with_exit_code_3_and_one_line(
    tmp_path: Path, kind_name: str, api_env: dict[str, str]
) -> None:
    kind = KINDS[kind_name]
    data = tmp_path / "data"
    data.mkdir()
    kind.write(data / f"good{kind.suffix}", "g")
    bad = truncated(kind, data)
    config = str(write_config(tmp_path, kind, data))
    result = run_cli("--config", config, "sync", "src", env=api_env, check=False)
    assert result.returncode == 3, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last == (
        f"sync src landed with problems: 1 quarantined in {bad.path.name} (damaged after line "
        f"{bad.quarantined[0] - 1:,}); see twinhub quarantine list --source src"  # type: ignore[index]
    )
    assert "Aborted" not in result.stdout + result.stderr
    runs = connect(tmp_path / "store").sql("SELECT status FROM run_record WHERE source = 'src'").fetchall()
    assert runs == [("succeeded",)], "a damaged file is no error to retry"

    kind.write(bad.path, "new")
    again = run_cli("--config", config, "sync", "src", env=api_env, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "landed with problems" not in again.stdout
    assert landed(kind, tmp_path / "store", "new") == GOOD


def test_the_cli_line_names_files_never_their_content(tmp_path: Path, api_env: dict[str, str]) -> None:
    kind = KINDS["lab-csv"]
    data = tmp_path / "data"
    data.mkdir()
    for name, recipe in (("r", bad_line(f"x,p1,718-7,{SECRET}".encode())), ("q", bad_line(b'x,"1"2'))):
        (data / name).mkdir()
        recipe(kind, data / name).path.rename(data / f"{name}.csv")
    config = str(write_config(tmp_path, kind, data))
    result = run_cli(
        "--config",
        config,
        "backfill",
        "src",
        "--since",
        "2020-01-01",
        "--until",
        "2030-01-01",
        env=api_env,
        check=False,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == (
        "backfill src landed with problems: 1 quarantined in q.csv, 1 in r.csv; "
        "see twinhub quarantine list --source src"
    )
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.shared
def test_a_cut_synthea_file_lands_what_it_holds_beside_the_rest_of_the_export(
    synthea: Path, tmp_path: Path
) -> None:
    """The shared Synthea export with its Observation file cut in half: the other files land
    whole, the Observations before the cut land, and the cut is the one line quarantined."""
    data = tmp_path / "data"
    data.mkdir()
    for file in synthea.glob("*.ndjson.gz"):
        (data / file.name).symlink_to(file)
    cut = data / "Observation.ndjson.gz"
    whole = cut.resolve().read_bytes()
    cut.unlink()
    cut.write_bytes(whole[: len(whole) // 2])
    kept = zlib.decompressobj(wbits=31).decompress(whole[: len(whole) // 2]).count(b"\n")
    report = sync(write_config(tmp_path, KINDS["fhir-ndjson"], data))
    read_equals_landed_plus_quarantined(report)
    total = sum(gzip.decompress(f.read_bytes()).count(b"\n") for f in synthea.glob("*.ndjson.gz"))
    observations = gzip.decompress(whole).count(b"\n")
    assert report.counts["lines_read"] == total - observations + kept + 1
    assert report.counts["quarantined"] == 1
    assert report.by_type["Observation"] == kept
