"""Damaged HL7 v2 files, read by the real connector from real files: what is damaged becomes a
problem row (file, message, line, reason), every good message of the file is a record."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from connectors.base import Batch
from connectors.labs.hl7v2 import Hl7v2Connector, Hl7v2Source
from connectors.labs.hl7v2_reader import MAX_RAW, MAX_SEGMENT
from tests.support.cli import run_cli
from tests.support.hl7v2 import MESSAGE
from tests.support.kinds import write_sources_config
from twin_store import connect


def numbered(n: int) -> str:
    return MESSAGE.replace("MSG001", f"MSG{n:03}").replace("FL1", f"FL{n}")  # an order each


GOOD = [numbered(n) for n in range(1, 4)]


def pull(path: Path) -> list[Batch]:
    return list(Hl7v2Connector(Hl7v2Source(name="labs", kind="hl7v2", path=path)).pull(None))


def landed(batches: list[Batch]) -> list[str]:
    return [text for b in batches for text in b.records["raw"].to_pylist()]


def problems(batches: list[Batch]) -> list[dict[str, object]]:
    return [p for b in batches for p in b.problems.to_pylist()]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_message_cut_short_at_the_end_is_quarantined_and_those_before_it_land(tmp_path: Path) -> None:
    text = "\r".join(GOOD).encode()
    path = write(tmp_path / "cut.hl7", text[: len(text) - 30])
    batches = pull(path)
    assert landed(batches) == GOOD[:2]
    (problem,) = problems(batches)
    assert (problem["file"], problem["line_no"]) == (str(path), 3)
    assert "message 3 (line 15, byte" in str(problem["reason"])
    assert "cut short: the file stops in mid-segment" in str(problem["reason"])
    assert GOOD[2].startswith(str(problem["raw"]))


def test_a_gzip_stream_that_ends_too_soon_keeps_what_was_read(tmp_path: Path) -> None:
    whole = gzip.compress(("\r".join(GOOD * 200) + "\r").encode())
    path = write(tmp_path / "cut.hl7.gz", whole[: len(whole) * 2 // 3])
    batches = pull(path)
    read = landed(batches)
    assert 0 < len(read) < 600 and read == (GOOD * 200)[: len(read)]
    (problem,) = problems(batches)
    assert "the gzip stream ends too soon" in str(problem["reason"])
    assert "replace the file and sync again" in str(problem["reason"])


def test_an_mllp_frame_that_never_ends_is_cut_short(tmp_path: Path) -> None:
    framed = b"".join(b"\x0b" + m.encode() + b"\x1c\r" for m in GOOD[:2]) + b"\x0b" + GOOD[2].encode()
    batches = pull(write(tmp_path / "framed.hl7", framed))
    assert landed(batches) == GOOD[:2]
    (problem,) = problems(batches)
    assert "its MLLP frame never ends" in str(problem["reason"])


def test_garbage_between_messages_is_quarantined_on_its_own(tmp_path: Path) -> None:
    text = f"{GOOD[0]}\r\n--- page 2 ---\r\nsee attached\r\n{GOOD[1]}\r\n".replace("\r\n", "\n")
    batches = pull(write(tmp_path / "junk.hl7", text.encode()))
    assert landed(batches) == GOOD[:2]
    (problem,) = problems(batches)
    assert (problem["line_no"], problem["raw"]) == (2, "--- page 2 ---\rsee attached")
    assert str(problem["reason"]).startswith("message 2 (line 8, byte")
    assert "no HL7 v2 segment" in str(problem["reason"])


def test_garbage_inside_a_message_quarantines_that_message_whole(tmp_path: Path) -> None:
    broken = GOOD[1].replace("\rOBX|2", "\rsee attached\rOBX|2")
    batches = pull(write(tmp_path / "inside.hl7", "\r".join([GOOD[0], broken, GOOD[2], ""]).encode()))
    assert landed(batches) == [GOOD[0], GOOD[2]]
    (problem,) = problems(batches)
    assert problem["raw"] == broken
    assert "line 13 (byte" in str(problem["reason"]) and "is no HL7 segment" in str(problem["reason"])


def test_bytes_that_are_not_utf8_quarantine_their_message_unless_msh_18_names_the_charset(
    tmp_path: Path,
) -> None:
    latin = numbered(2).replace("Doe^Jane", "Müller^Jane").replace("|P|2.5.1", "|P|2.5.1||||||8859/1")
    mangled = numbered(3).replace("Doe", "Mü").encode("latin-1")
    data = b"\r".join([GOOD[0].encode(), mangled, latin.encode("latin-1"), b""])
    batches = pull(write(tmp_path / "latin.hl7", data))
    assert landed(batches) == [GOOD[0], latin]
    (problem,) = problems(batches)
    assert problem["line_no"] == 2
    assert "is not utf-8; send UTF-8 or name the character set in MSH-18" in str(problem["reason"])
    assert "M\\xfc" in str(problem["raw"])


def test_a_message_without_msh_after_a_blank_line_is_its_own_record(tmp_path: Path) -> None:
    headless = GOOD[1].split("\r", 1)[1]
    batches = pull(write(tmp_path / "headless.hl7", "\n\n".join([GOOD[0], headless, GOOD[2], ""]).encode()))
    assert landed(batches) == [GOOD[0], headless, GOOD[2]]  # the mapping refuses it: no MSH


def test_a_segment_over_the_limit_is_skipped_unread_and_its_message_quarantined(tmp_path: Path) -> None:
    huge = GOOD[1].replace("hemolysed sample", "x" * (MAX_SEGMENT + 10))
    batches = pull(write(tmp_path / "huge.hl7", "\r".join([GOOD[0], huge, GOOD[2], ""]).encode()))
    assert landed(batches) == [GOOD[0], GOOD[2]]
    (problem,) = problems(batches)
    assert problem["line_no"] == 2 and "is a segment over 16 MiB" in str(problem["reason"])
    assert len(str(problem["raw"])) <= MAX_RAW


def test_records_and_problems_add_up_to_every_message_read(tmp_path: Path) -> None:
    text = "\r".join([*GOOD, "garbage line", numbered(4), numbered(5)[:-20]])
    batches = pull(write(tmp_path / "mixed.hl7", text.encode()))
    assert [len(landed(batches)), len(problems(batches))] == [4, 2]
    numbers = sorted(
        n for b in batches for n in [*b.records["line_no"].to_pylist(), *b.problems["line_no"].to_pylist()]
    )
    assert numbers == [1, 2, 3, 4, 5, 6]


MEASURE = """
import json, sys
from pathlib import Path
from connectors.labs.hl7v2 import Hl7v2Connector, Hl7v2Source

source = Hl7v2Source(name="big", kind="hl7v2", path=Path(sys.argv[1]))
counted = {"records": 0, "problems": 0}
for batch in Hl7v2Connector(source).pull(None):
    counted["records"] += batch.records.num_rows
    counted["problems"] += batch.problems.num_rows
status = Path("/proc/self/status").read_text().splitlines()
counted["max_rss_mb"] = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
print(json.dumps(counted))
"""


@pytest.mark.slow
def test_a_300_mb_file_streams_in_under_a_gigabyte(tmp_path: Path) -> None:
    message = (numbered(7) + "\r").encode()
    copies = 300_000_000 // len(message) + 1
    path = tmp_path / "big.hl7"
    with path.open("wb") as fh:
        for _ in range(copies // 1000):
            fh.write(message * 1000)
    assert path.stat().st_size > 290_000_000
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, check=True, timeout=1200
    )
    counted = json.loads(done.stdout)
    print(f"hl7v2 {path.stat().st_size / 1e6:.0f} MB: {counted}")
    assert (counted["records"], counted["problems"]) == (copies // 1000 * 1000, 0)
    assert counted["max_rss_mb"] < 1024


def test_the_other_files_are_read_and_a_replaced_damaged_file_is_read_again(tmp_path: Path) -> None:
    whole = gzip.compress(("\r".join(GOOD) + "\r").encode())
    write(tmp_path / "a.hl7.gz", whole[:-12])
    write(tmp_path / "b.hl7", "".join(numbered(n) + "\r" for n in (4, 5)).encode())
    source = Hl7v2Source(name="labs", kind="hl7v2", path=tmp_path)
    first = list(Hl7v2Connector(source).pull(None))
    assert landed(first) == [*GOOD[:2], numbered(4), numbered(5)]
    assert [p["line_no"] for p in problems(first)] == [3]
    unchanged = list(Hl7v2Connector(source).pull(first[-1].watermark))
    assert (landed(unchanged), problems(unchanged)) == ([], []), "each file is read once"
    write(tmp_path / "a.hl7.gz", whole)
    again = list(Hl7v2Connector(source).pull(first[-1].watermark))
    assert (landed(again), problems(again)) == (GOOD, [])


@pytest.mark.slow
def test_a_damaged_file_lands_its_good_part_beside_the_other_files_and_lands_whole_once_replaced(
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    whole = gzip.compress(("\r".join(GOOD) + "\r").encode())
    write(inbox / "a-damaged.hl7.gz", whole[:-12])  # the gzip trailer and some data gone
    write(inbox / "b-good.hl7", "".join(numbered(n) + "\r" for n in (4, 5)).encode())
    config = write_sources_config(tmp_path, {"labs": {"kind": "hl7v2", "path": str(inbox)}})
    first = run_cli("--config", str(config), "sync", "labs", check=False)
    assert first.returncode == 3, first.stdout + first.stderr  # landed with problems
    con = connect(tmp_path / "store")
    reports = "SELECT count(*) FROM fhir_resource WHERE resource_type = 'DiagnosticReport'"
    (quarantined,) = con.sql("SELECT file, reason FROM quarantine").fetchall()
    assert quarantined[0] == str(inbox / "a-damaged.hl7.gz") and "ends too soon" in quarantined[1]
    assert "Doe" not in first.stdout + first.stderr, "no patient data in what is printed"
    (landed_first,) = con.sql(reports).fetchone() or (0,)
    con.close()
    assert 2 <= landed_first < 5, "the good file and the readable part of the damaged one"

    write(inbox / "a-damaged.hl7.gz", whole)  # the sender sends the file again, whole
    run_cli("--config", str(config), "sync", "labs")
    con = connect(tmp_path / "store")
    assert con.sql(reports).fetchone() == (5,), "the replaced file lands whole"
