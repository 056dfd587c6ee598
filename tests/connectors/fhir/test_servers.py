"""The fhir-search and fhir-bulk sources against a real FHIR server (sekmet) on 127.0.0.1, with a
fault-injecting proxy in between where the test says so. Each sync runs the real pipeline into a
real store on disk (the Prefect task's function, without the Prefect server)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import orjson
import pytest
from xxhash import xxh3_64_intdigest

from connectors.errors import SourceError, TransientError
from flows.sync import land_source
from tests.support.fault_proxy import FaultProxy
from tests.support.fhir_server import FhirServer, SekmetTemplate
from tests.support.fhir_servers import TYPES, Key, bulk_dump, stored, write_source
from twin_store import RunReport, connect


def sync(config: Path) -> RunReport:
    return land_source.fn(str(config), "ehr")


def search_dump(server: FhirServer) -> dict[Key, int]:
    """The server's resources as a client reading them by search sees them, hashed as stored."""
    return {key: xxh3_64_intdigest(orjson.dumps(r)) for key, r in server.dump(TYPES).items()}


def per_type(keys: dict[Key, int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rtype, _ in keys:
        counts[rtype] = counts.get(rtype, 0) + 1
    return dict(sorted(counts.items()))


@pytest.mark.parametrize("kind", ["fhir-search", "fhir-bulk"])
def test_full_sync_holds_exactly_the_servers_resources(
    fhir_server: FhirServer, sekmet_template: SekmetTemplate, tmp_path: Path, kind: str
) -> None:
    config = write_source(tmp_path, fhir_server.base_url, kind, page_size=250)
    report = sync(config)
    expected = search_dump(fhir_server) if kind == "fhir-search" else bulk_dump(fhir_server.base_url)
    assert per_type(expected) == sekmet_template.counts
    assert stored(config) == expected  # same keys, same content hashes
    assert report.counts["inserted"] == len(expected)
    assert report.counts["quarantined"] == 0
    assert dict(report.by_type) == sekmet_template.counts
    if kind == "fhir-search":
        assert report.stats["pages"] >= len(expected) // 250
    else:
        assert report.stats["files"] == len(TYPES) and report.stats["exports"] == 1
    again = sync(config)
    assert again.counts["inserted"] == again.counts["updated"] == again.counts["deleted"] == 0


def test_incremental_syncs_carry_exactly_the_changes(fhir_server: FhirServer, tmp_path: Path) -> None:
    configs = {
        kind: write_source(tmp_path / kind, fhir_server.base_url, kind, page_size=500)
        for kind in ("fhir-search", "fhir-bulk")
    }
    first = {kind: sync(config) for kind, config in configs.items()}
    before = {kind: _rows(config) for kind, config in configs.items()}

    current = fhir_server.dump(["Patient", "Observation", "Encounter"])
    patients = sorted(k for k in current if k[0] == "Patient")[:2]
    observations = sorted(k for k in current if k[0] == "Observation")[:3]
    encounters = sorted(k for k in current if k[0] == "Encounter")[:2]
    for key in patients + observations:
        fhir_server.put({**current[key], "language": "de"})
    for rtype, rid in encounters:
        fhir_server.delete(rtype, rid)
    subject = {"reference": f"Patient/{patients[0][1]}"}
    fhir_server.put({"resourceType": "Condition", "id": "new-condition-1", "subject": subject})
    changed = set(patients + observations)

    expected = search_dump(fhir_server)
    for kind, config in configs.items():
        report = sync(config)
        counts = report.counts
        assert (counts["inserted"], counts["updated"], counts["deleted"]) == (1, 5, 2), kind
        assert set(stored(config)) == set(expected), kind
        after = _rows(config)
        for key, (version, run_id) in before[kind].items():
            if key in changed:
                assert after[key] == (2, report.run_id), (kind, key)
            elif key not in encounters:
                assert after[key] == (version, run_id) == (1, first[kind].run_id), (kind, key)
        con = connect(config.parent / "store")
        gone = con.sql(
            f"SELECT count(*) FROM encounter WHERE id IN ({', '.join(repr(i) for _, i in encounters)})"
        ).fetchone()
        assert gone == (0,), "flat rows of deleted resources are removed too"


def _rows(config: Path) -> dict[Key, tuple[int, str]]:
    con = connect(config.parent / "store")
    rows = con.sql("SELECT resource_type, id, version_id, run_id FROM fhir_resource").fetchall()
    return {(t, i): (v, r) for t, i, v, r in rows}


@pytest.mark.parametrize("kind", ["fhir-search", "fhir-bulk"])
def test_faults_leave_the_result_identical(
    fhir_server: FhirServer, fault_proxy: FaultProxy, tmp_path: Path, kind: str
) -> None:
    clean = write_source(tmp_path / "clean", fhir_server.base_url, kind, page_size=400)
    sync(clean)
    faulty = write_source(
        tmp_path / "faulty", fault_proxy.base_url, kind, page_size=400, timeout_seconds=3, retries=4
    )
    data = "bulk-files" if kind == "fhir-bulk" else "Observation"
    fault_proxy.add_fault("429", match=data, retry_after=1)
    fault_proxy.add_fault("503", match="Patient")
    fault_proxy.add_fault("drop", match=data)
    # Slow (longer than the timeout) and reset not on the kick-off, which is not retried once sent.
    files = "bulk-files/.*" if kind == "fhir-bulk" else ""
    fault_proxy.add_fault("slow", match=re.compile(files + "Encounter"), delay=4)
    fault_proxy.add_fault("reset", match=re.compile(files + "Procedure"))
    if kind == "fhir-bulk":
        fault_proxy.add_fault("503", match="bulk-status")
    report = sync(faulty)
    assert stored(faulty) == stored(clean)
    assert set(fault_proxy.injected) == {"429", "503", "drop", "slow", "reset"}
    assert report.stats["retries"] == sum(fault_proxy.injected.values())


def test_bulk_files_sent_gzip_encoded_are_kept_compressed_and_land_the_same(
    fhir_server: FhirServer, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    plain = write_source(tmp_path / "plain", fhir_server.base_url, "fhir-bulk")
    plain_report = sync(plain)
    gzipped = write_source(tmp_path / "gzip", fault_proxy.base_url, "fhir-bulk")
    fault_proxy.add_fault("gzip", match="bulk-files", times=len(TYPES))
    report = sync(gzipped)
    assert fault_proxy.injected["gzip"] == len(TYPES)
    assert stored(gzipped) == stored(plain)
    assert report.stats["bytes"] < plain_report.stats["bytes"] / 4  # written to disk as received


def test_a_search_walk_that_misses_matches_keeps_its_watermark(
    fhir_server: FhirServer, fault_proxy: FaultProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """sekmet pages by offset: a resource updated mid-walk moves to the end, so the next page
    starts one too far and a resource is skipped. The walk notices and keeps the watermark."""
    config = write_source(
        tmp_path, fault_proxy.base_url, "fhir-search", page_size=200, resource_types=["Observation"]
    )
    with fhir_server.client() as http:
        first = http.get("Observation", params={"_count": 200}).json()["entry"][0]["resource"]
    # Page 1 has been served; before page 2 is, a resource of page 1 changes.
    move = functools.partial(fhir_server.put, {**first, "language": "fr"})
    fault_proxy.add_fault("slow", match="_offset=200", delay=0.1, on_hold=move)
    sync(config)
    assert "Observation changed during the search" in caplog.text
    server = {k: v for k, v in search_dump(fhir_server).items() if k[0] == "Observation"}
    assert set(stored(config)) != set(server)  # one resource was skipped ...
    sync(config)
    assert stored(config) == server  # ... and the next sync, asking again, has it


def test_a_failed_export_job_is_dropped_and_the_next_sync_starts_anew(
    fhir_server: FhirServer, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    config = write_source(tmp_path, fault_proxy.base_url, "fhir-bulk")
    fault_proxy.add_fault("500", match="bulk-status")
    with pytest.raises(
        SourceError, match=r"export job .* failed \(see above\); the next sync starts a new export"
    ):
        sync(config)
    sync(config)
    assert sum("$export" in r.path for r in fault_proxy.requests) == 2
    assert stored(config) == bulk_dump(fhir_server.base_url)


def test_files_that_need_no_token_are_fetched_without_one(
    sekmet_template: SekmetTemplate, tmp_path: Path
) -> None:
    server = sekmet_template.spawn(tmp_path / "sekmet", auth=False)  # manifest: requiresAccessToken false
    try:
        with FaultProxy(server.root_url) as proxy:
            config = write_source(tmp_path, proxy.base_url, "fhir-bulk")
            sync(config)
            files = [p for p in (r.path for r in proxy.requests) if "bulk-files" in p]
            assert len(files) == len(TYPES)
            assert any("$export" in p for p in proxy.authorized)  # the token goes to the API ...
            assert not any("bulk-files" in p for p in proxy.authorized)  # ... not to the file URLs
            assert len(stored(config)) == sekmet_template.count
    finally:
        server.stop()


def test_group_export_with_a_type_filter_holds_only_what_was_asked(
    fhir_server: FhirServer, tmp_path: Path
) -> None:
    patients = sorted(i for t, i in fhir_server.dump(["Patient"]) if t == "Patient")[:5]
    members = [{"entity": {"reference": f"Patient/{p}"}} for p in patients]
    fhir_server.put(
        {"resourceType": "Group", "id": "cohort", "type": "person", "actual": True, "member": members}
    )
    config = write_source(
        tmp_path,
        fhir_server.base_url,
        "fhir-bulk",
        level="group",
        group_id="cohort",
        resource_types=["Patient", "Observation"],
        type_filters=["Observation?code=8867-4"],
    )
    sync(config)
    expected = {
        (t, i)
        for (t, i), r in fhir_server.dump(["Patient", "Observation"]).items()
        if (t == "Patient" and i in patients)
        or (
            t == "Observation"
            and r["subject"]["reference"].split("/")[-1] in patients
            and any(c["code"] == "8867-4" for c in r["code"]["coding"])
        )
    }
    assert {"Patient", "Observation"} == {t for t, _ in expected}
    assert set(stored(config)) == expected


@pytest.mark.slow
def test_an_export_job_the_server_forgot_is_started_again_with_the_same_since(
    fhir_server: FhirServer, fault_proxy: FaultProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_source(tmp_path, fault_proxy.base_url, "fhir-bulk")
    sync(config)
    fhir_server.put({**next(iter(fhir_server.dump(["Patient"]).values())), "language": "de"})
    fault_proxy.add_fault("reset", match="bulk-files", times=10)  # every try of the first file fails
    with pytest.raises(TransientError):
        sync(config)
    fhir_server.restart()  # sekmet keeps export jobs in memory: the saved job is gone
    report = sync(config)
    assert "no longer knows export job" in caplog.text
    kickoffs = [r.path for r in fault_proxy.requests if "$export" in r.path]
    assert len(kickoffs) == 3 and kickoffs[1] == kickoffs[2]  # the same _since again
    assert (report.counts["updated"], report.counts["inserted"]) == (1, 0)
    assert stored(config) == bulk_dump(fhir_server.base_url)
