"""The store lock is held only while the store is written, a source's run lock for its whole run,
and whoever waits for either says who holds it; a copied or moved store folder is its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import psutil
import pytest

from connectors.errors import StoreError
from connectors.fhir.ndjson import FhirNdjsonConnector, FhirNdjsonSource
from tests.support.data import write_ndjson
from twin_store import RunReport, TwinStore, connect, prepare
from twin_store.connection import attach_statements


def patient(i: int, family: str, updated: str = "2024-01-01T00:00:00Z") -> dict[str, object]:
    return {
        "resourceType": "Patient",
        "id": f"p{i}",
        "meta": {"lastUpdated": updated},
        "name": [{"family": family}],
    }


def land(store: TwinStore, source: str, folder: Path, run: RunReport | None = None) -> RunReport:
    """Land every line of `folder` as `source` in one run (the given one, still open, or a new one)."""
    mine = run is None
    run = run or store.begin_run(source, "sync")
    for batch in FhirNdjsonConnector(FhirNdjsonSource(name=source, kind="fhir-ndjson", path=folder)).pull(
        None
    ):
        store.land(run, prepare(batch))
    return store.finish_run(run, "succeeded") if mine else run


def test_writers_share_the_store_between_batches_and_say_who_holds_a_lock(tmp_path: Path) -> None:
    root = tmp_path / "store"
    first = write_ndjson(tmp_path / "a" / "Patient.ndjson", [patient(1, "Ames")]).parent
    other = write_ndjson(tmp_path / "b" / "Patient.ndjson", [patient(2, "Bell")]).parent
    with TwinStore(root) as ehr, TwinStore(root, lock_timeout=0.5) as labs:
        run = ehr.begin_run("ehr", "sync")  # a long run, waiting on its server between batches
        land(ehr, "ehr", first, run)
        assert land(labs, "labs", other).counts["inserted"] == 1  # lands meanwhile

        with pytest.raises(StoreError) as same_source:
            labs.begin_run("ehr", "sync")
        message = str(same_source.value)
        assert (
            f"source 'ehr' is busy: sync of ehr (run {run.run_id}, pid {os.getpid()}) holds it since "
            in message
        )
        assert "\n" not in message

        with ehr.writing(), pytest.raises(StoreError) as busy:  # while a batch lands
            land(labs, "labs", other)
        assert f"the store is busy: sync of ehr (run {run.run_id}, pid {os.getpid()}) holds it since " in str(
            busy.value
        )
        ehr.finish_run(run, "succeeded")
        assert labs.begin_run("ehr", "sync").source == "ehr"  # its lock is free once the run ends
    with TwinStore(root) as later:  # the runs the stores left open (their locks free) ended
        later.finish_run(later.begin_run("labs", "sync"), "succeeded")
    con = connect(root)
    assert con.sql("SELECT id, source FROM fhir_resource ORDER BY id").fetchall() == [
        ("p1", "ehr"),
        ("p2", "labs"),
    ]
    assert con.sql("SELECT source, status FROM run_record ORDER BY started_at").fetchall() == [
        ("ehr", "succeeded"),
        ("labs", "succeeded"),
        ("labs", "interrupted"),
        ("ehr", "interrupted"),
        ("labs", "succeeded"),
    ]


def test_a_writer_reads_again_what_another_wrote_between_its_batches(tmp_path: Path) -> None:
    """A listener keeps its store open; a sync of the same source lands meanwhile: the listener's
    next batch judges against what the store holds now, not what it remembered."""
    root = tmp_path / "store"
    v1 = write_ndjson(tmp_path / "v1" / "Patient.ndjson", [patient(1, "Ames", "2024-01-01T00:00:00Z")]).parent
    v2 = write_ndjson(tmp_path / "v2" / "Patient.ndjson", [patient(1, "Bell", "2024-02-01T00:00:00Z")]).parent
    v3 = write_ndjson(tmp_path / "v3" / "Patient.ndjson", [patient(1, "Cole", "2024-03-01T00:00:00Z")]).parent
    with TwinStore(root) as listener:
        land(listener, "ehr", v1)
        with TwinStore(root) as sync:
            land(sync, "ehr", v2)
        assert land(listener, "ehr", v3).counts["updated"] == 1
    rows = connect(root).sql("SELECT version_id, resource->>'$.name[0].family' FROM fhir_resource").fetchall()
    assert rows == [(3, "Cole")]


def test_a_copied_or_moved_store_reads_and_writes_its_own_files(tmp_path: Path) -> None:
    data = write_ndjson(tmp_path / "in" / "Patient.ndjson", [patient(i, "Ames") for i in range(3)]).parent
    original, copy, moved = tmp_path / "store", tmp_path / "copy" / "store", tmp_path / "moved"
    with TwinStore(original) as store:
        land(store, "ehr", data)
        store.con.execute(
            "CALL ducklake_flush_inlined_data('twin')"
        )  # rows in Parquet files, not the catalog
    copy.parent.mkdir()
    subprocess.run(["cp", "-a", str(original), str(copy)], check=True)
    original.rename(moved)  # the original is gone from where the catalog says its files are
    more = write_ndjson(tmp_path / "more" / "Patient.ndjson", [patient(7, "Bell")]).parent
    with TwinStore(copy) as store:
        land(store, "ehr", more)
        store.con.execute("CALL ducklake_flush_inlined_data('twin')")
    con = connect(copy)
    assert con.sql("SELECT count(*), sum(length(resource)) > 0 FROM fhir_resource").fetchone() == (4, True)
    files = [
        f for (f,) in con.sql("SELECT data_file FROM ducklake_list_files('twin', 'fhir_resource')").fetchall()
    ]
    assert files and all(f.startswith(f"{copy.resolve()}/data/") for f in files)
    assert not original.exists()  # nothing was written where the original was
    shutil.rmtree(moved)
    other = duckdb.connect()  # as `twinhub attach-sql` opens it in any DuckDB client
    other.execute(attach_statements(copy))
    assert other.sql("SELECT count(*), sum(length(resource)) > 0 FROM fhir_resource").fetchone() == (4, True)


def test_the_daily_fhir_process_ends_with_a_killed_writer() -> None:
    """The writer's helper process (and multiprocessing's resource tracker) end within seconds
    of a SIGKILL of the writer, rather than waiting forever for work."""
    script = (
        "import os, signal, psutil\n"
        "from twin_store.store import fhir_maker\n"
        "maker = fhir_maker()\n"
        "assert maker.submit(abs, -1).result() == 1\n"
        "print(' '.join(str(c.pid) for c in psutil.Process().children(recursive=True)), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    helpers = [psutil.Process(int(pid)) for pid in writer.stdout.readline().split()]
    writer.wait()
    assert helpers
    _, alive = psutil.wait_procs(helpers, timeout=10)
    for process in alive:
        process.kill()
    assert not alive, [" ".join(p.cmdline())[:100] for p in alive]
