"""The `twinhub` CLI as a user runs it: real subprocesses, a real store, a real Prefect server."""

from __future__ import annotations

import gzip
import os
import pty
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from flows.sample_export import write_sample_export
from tests.support.cli import TWINHUB, run_cli
from tests.support.data import write_config, write_ndjson
from tests.support.hl7v2 import MESSAGE
from twin_store import connect, view_relation
from twin_store.views import load_view, view_files


def store_contents(store: Path) -> dict[str, list[tuple[object, ...]]]:
    con = connect(store)
    return {
        "fhir_resource": con.sql(
            "SELECT resource_type, id, version_id, content_hash FROM fhir_resource ORDER BY ALL"
        ).fetchall(),
        "observation": con.sql("SELECT * FROM observation ORDER BY ALL").fetchall(),
        "patient": con.sql("SELECT * FROM patient ORDER BY ALL").fetchall(),
        "quarantine": con.sql("SELECT file, line_no, reason FROM quarantine ORDER BY ALL").fetchall(),
    }


@pytest.mark.slow
def test_sync_synthea_exactly_as_documented(synthea: Path, tmp_path: Path, api_env: dict[str, str]) -> None:
    (tmp_path / "twinhub.toml").write_text(
        f'[store]\npath = ".twinhub"\n[[sources]]\nname = "synthea"\nkind = "fhir-ndjson"\n'
        f'path = "{synthea}"\nschedule = "0 2 * * *"\n'
    )
    os.chdir(tmp_path)
    run_cli("--config", "twinhub.toml", "sync", "synthea", env=api_env)
    result = run_cli(
        "--config",
        "twinhub.toml",
        "sql",
        "select resource_type, count(*) as n from fhir_resource group by 1 order by 1",
        "--format",
        "csv",
        env=api_env,
    )
    expected = {
        f.name.split(".")[0]: gzip.decompress(f.read_bytes()).count(b"\n")
        for f in synthea.glob("*.ndjson.gz")
    }
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "resource_type,n"
    assert {t: int(n) for t, n in (line.split(",") for line in lines[1:])} == expected
    assert sum(expected.values()) == 189_111

    before = store_contents(tmp_path / ".twinhub")
    run_cli("--config", "twinhub.toml", "sync", "synthea", env=api_env)
    assert store_contents(tmp_path / ".twinhub") == before
    con = connect(tmp_path / ".twinhub")
    first, second = con.sql(
        "SELECT epoch(finished_at - started_at) FROM ingest_run ORDER BY started_at"
    ).fetchall()
    assert second[0] * 5 <= first[0]
    assert con.sql("SELECT count(*) - count(DISTINCT (resource_type, id)) FROM fhir_resource").fetchone() == (
        0,
    )
    # The standard views are materialized as tables equal to the views evaluated afresh, and the
    # second sync (no changes) recomputed none of them: it made no snapshot at all.
    (first_snapshot,), (second_snapshot,) = con.sql(
        "SELECT snapshot_id FROM ingest_run ORDER BY started_at"
    ).fetchall()
    assert second_snapshot == first_snapshot
    rows = {}
    for name in view_files():
        table = con.table(name)
        assert not table.except_(view_relation(con, load_view(name))).count("*").fetchone()[0], name
        assert not view_relation(con, load_view(name)).except_(table).count("*").fetchone()[0], name
        rows[name] = table.count("*").fetchone()[0]
    # They give what an analyst expects: one observation row per Observation, and the category
    # views plus the other categories make up the whole.
    assert rows["observation"] == expected["Observation"]
    assert rows["patient"] == expected["Patient"] and rows["encounter"] == expected["Encounter"]
    (others,) = con.sql(
        "SELECT count(*) FROM observation "
        "WHERE category NOT IN ('laboratory', 'vital-signs') OR category IS NULL"
    ).fetchone()
    assert rows["lab_result"] + rows["vital_sign"] + others == rows["observation"]
    observations = [
        orjson.loads(line)
        for line in gzip.decompress((synthea / "Observation.ndjson.gz").read_bytes()).splitlines()
    ]
    categories = Counter(
        coding.get("code")
        for observation in observations
        for category in observation.get("category", [])
        for coding in category.get("coding", [])
    )
    assert (rows["lab_result"], rows["vital_sign"]) == (categories["laboratory"], categories["vital-signs"])
    assert rows["observation_component"] == sum(len(o.get("component", [])) for o in observations)
    patients = [
        orjson.loads(line)
        for line in gzip.decompress((synthea / "Patient.ndjson.gz").read_bytes()).splitlines()
    ]
    assert rows["patient_identifier"] == sum(len(p.get("identifier", [])) for p in patients)


@pytest.mark.slow
def test_bad_lines_are_quarantined_and_accounted_for(tmp_path: Path, api_env: dict[str, str]) -> None:
    good = [{"resourceType": "Patient", "id": f"p{i}", "gender": "female"} for i in range(50)]
    lines: list[dict[str, object] | str] = [
        *good[:20],
        '{"resourceType": "Patient", "id": "x"',
        {"resourceType": "Patient"},
        {"resourceType": "Observation", "id": "o1"},
        *good[20:],
    ]
    write_ndjson(tmp_path / "export" / "Patient.ndjson", lines)
    config = write_config(tmp_path, tmp_path / "export")
    run_cli("--config", str(config), "sync", "src", env=api_env)
    con = connect(tmp_path / "store")
    assert con.sql("SELECT count(*) FROM patient").fetchone() == (50,)
    assert con.sql("SELECT line_no, reason FROM quarantine ORDER BY 1").fetchall() == [
        (21, "invalid JSON"),
        (22, "missing id"),
        (23, 'resourceType "Observation" does not match the file, which holds Patient'),
    ]
    assert con.sql("SELECT lines_read, inserted + quarantined FROM ingest_run").fetchall() == [(53, 53)]
    status = run_cli("--config", str(config), "status", env={**api_env, "COLUMNS": "250"}).stdout
    assert "53" in status and "invalid JSON" in status and "1/1 files complete, 53 lines" in status


def start_sync(config: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [TWINHUB, "--config", str(config), "sync", "src"],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **env},
    )


def without_prefect(home: Path) -> dict[str, str]:
    """A user's environment: no Prefect server nor any PREFECT_* setting, not CI, and a home of
    its own (so what Prefect would write to ~/.prefect shows)."""
    ci = {"CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "BUILDKITE", "CI_NAME", "DO_NOT_TRACK"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in ci}
    home.mkdir(parents=True, exist_ok=True)
    return env | {"HOME": str(home)}


def in_group(pgid: int) -> list[int]:
    """The live processes of process group `pgid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def wait_for_landed_lines(
    store: Path, proc: subprocess.Popen[str], minimum: int, timeout: float = 120
) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            row = connect(store).sql("SELECT coalesce(sum(lines_read), 0) FROM ingest_run").fetchone()
            if row and row[0] >= minimum:
                return int(row[0])
        except Exception:
            pass  # the store is not created yet
        time.sleep(0.05)
    raise AssertionError(f"sync ended or stalled before landing {minimum} lines: {proc.poll()}")


@pytest.mark.slow
def test_sigkill_mid_sync_then_rerun_equals_a_clean_run(tmp_path: Path, api_env: dict[str, str]) -> None:
    write_sample_export(tmp_path / "export", patients=600)
    (tmp_path / "export" / "Patient.ndjson.gz").write_bytes(
        gzip.compress(
            gzip.decompress((tmp_path / "export" / "Patient.ndjson.gz").read_bytes()) + b"not json\n"
        )
    )
    clean = write_config(tmp_path / "clean", tmp_path / "export", batch_mb=1)
    run_cli("--config", str(clean), "sync", "src", env=api_env)

    crashed = write_config(tmp_path / "crashed", tmp_path / "export", batch_mb=1)
    proc = start_sync(crashed, api_env)
    landed = wait_for_landed_lines(tmp_path / "crashed" / "store", proc, minimum=1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    total = store_contents(tmp_path / "clean" / "store")
    assert 0 < landed < len(total["fhir_resource"]) + 1
    run_cli("--config", str(crashed), "sync", "src", env=api_env)
    assert store_contents(tmp_path / "crashed" / "store") == total
    statuses = (
        connect(tmp_path / "crashed" / "store")
        .sql("SELECT status FROM ingest_run ORDER BY started_at")
        .fetchall()
    )
    assert statuses == [("interrupted",), ("succeeded",)]


@pytest.mark.slow
def test_ctrl_c_stops_a_sync_at_once_and_the_next_sync_lands_the_rest(
    tmp_path: Path, api_env: dict[str, str]
) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) on a sync without a Prefect server: exit
    130 within 5 s with one line, the run `interrupted`, no process of the group left (the
    temporary Prefect server included), and the next sync lands the rest as a clean run would."""
    write_sample_export(tmp_path / "export", patients=3000)  # well over 10 s of landing
    clean = write_config(tmp_path / "clean", tmp_path / "export", batch_mb=1)
    run_cli("--config", str(clean), "sync", "src", env=api_env)

    stopped = write_config(tmp_path / "stopped", tmp_path / "export", batch_mb=1)
    store = tmp_path / "stopped" / "store"
    env = without_prefect(tmp_path / "home")
    proc = subprocess.Popen(
        [TWINHUB, "--config", str(stopped), "sync", "src"],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group, as a terminal gives a command
    )
    try:
        wait_for_landed_lines(store, proc, minimum=1, timeout=300)
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr
    assert took < 5, f"took {took:.1f} s to stop"
    assert in_group(proc.pid) == [], "a process of the sync's group outlived it"
    [(run_id, status, lines)] = (
        connect(store).sql("SELECT run_id, status, lines_read FROM ingest_run").fetchall()
    )
    assert status == "interrupted"
    total = store_contents(tmp_path / "clean" / "store")
    assert 0 < lines < len(total["fhir_resource"])
    assert stderr.strip() == (
        f"interrupted: run {run_id} of src stopped after {lines:,} lines; the next sync resumes"
    )
    assert (store / ".prefect" / "prefect.db").is_file(), "the temporary server's database is the project's"

    run_cli("--config", str(stopped), "sync", "src", env=api_env)
    assert store_contents(store) == total
    statuses = connect(store).sql("SELECT status FROM ingest_run ORDER BY started_at").fetchall()
    assert statuses == [("interrupted",), ("succeeded",)]


def on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run twinhub with a pseudo-terminal for its output, as a user's shell does; its exit
    status and what it printed."""
    main, terminal = pty.openpty()
    proc = subprocess.Popen([TWINHUB, *args], stdin=terminal, stdout=terminal, stderr=terminal, env=env)
    os.close(terminal)
    printed = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        printed += chunk
    os.close(main)
    return proc.wait(timeout=120), printed.decode(errors="replace")


def test_prefect_keeps_to_the_project_and_never_shows_its_telemetry_notice(tmp_path: Path) -> None:
    """A new user on a terminal, no PREFECT_* set: a command that runs no flow makes no Prefect
    home at all; a sync keeps Prefect's in the store's `.prefect`, not ~/.prefect; and Prefect's
    first-run telemetry notice never prints (nor is anything sent)."""
    write_ndjson(tmp_path / "export" / "Patient.ndjson", [{"resourceType": "Patient", "id": "p1"}])
    config = write_config(tmp_path / "project", tmp_path / "export", schedule="0 2 * * *")
    home, prefect_home = tmp_path / "home", tmp_path / "project" / "store" / ".prefect"
    code, printed = on_a_terminal(["--config", str(config), "status"], without_prefect(home))
    assert code == 1 and "no twin store at" in printed, printed  # status, before any sync
    assert not (home / ".prefect").exists() and not prefect_home.exists()

    code, printed = on_a_terminal(["--config", str(config), "sync", "src"], without_prefect(home))
    assert code == 0, printed
    assert "usage data" not in printed and "telemetry" not in printed, printed
    assert not (home / ".prefect").exists()
    assert (prefect_home / "prefect.db").is_file()


@pytest.mark.slow
def test_readers_never_block_and_see_only_committed_batches(tmp_path: Path, api_env: dict[str, str]) -> None:
    write_sample_export(tmp_path / "export", patients=2000)  # a few seconds of landing
    config = write_config(tmp_path, tmp_path / "export", batch_mb=1)
    store = tmp_path / "store"
    proc = start_sync(config, api_env)
    wait_for_landed_lines(store, proc, minimum=1)
    seen = []
    while proc.poll() is None:
        # Data and bookkeeping commit together, so in any snapshot they agree.
        landed, recorded = connect(store).sql(
            "SELECT (SELECT count(*) FROM fhir_resource), (SELECT sum(inserted) FROM ingest_run)"
        ).fetchone() or (None, None)
        assert landed == recorded
        seen.append(landed)
        if len(seen) % 10 == 0:
            out = run_cli(
                "--config",
                str(config),
                "sql",
                "select count(*) as n from fhir_resource",
                "--format",
                "json",
                env=api_env,
            ).stdout
            assert orjson.loads(out)[0]["n"] >= landed
    assert proc.returncode == 0, proc.stderr
    assert seen == sorted(seen) and len(set(seen)) > 1


def test_user_mistakes_are_one_line_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[[sources]]\nname = "s"\nkind = "nope"\npath = "x"\n')
    for args, message in [
        (["--config", str(tmp_path / "bad.toml"), "status"], "unknown kind 'nope'"),
        (["--config", str(tmp_path / "missing.toml"), "status"], "does not exist"),
    ]:
        result = run_cli(*args, check=False)
        assert result.returncode == 1
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1

    config = write_config(tmp_path, tmp_path / "nowhere")
    for args, message in [
        (["sql", "select 1"], "no twin store at"),
        (["sync", "src"], "path '" + str(tmp_path / "nowhere") + "' does not exist; point sources.path"),
        (["sync", "other"], "config sources.other: no such source (known: src); add a [[sources]] table"),
        (["backfill", "src", "--since", "2020-01-01", "--until", "2019-01-01"], "must be before --until"),
    ]:
        result = run_cli("--config", str(config), *args, check=False)
        assert result.returncode == 1
        assert result.stderr.startswith("error: ")
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_reset_forgets_where_a_source_got_only_when_told_and_a_reread_duplicates_nothing(
    tmp_path: Path,
) -> None:
    from flows.sync import land_source

    patients = [{"resourceType": "Patient", "id": f"p{i}"} for i in range(3)]
    export = write_ndjson(tmp_path / "export" / "Patient.ndjson", [*patients, "not json"])
    config = write_config(tmp_path, export.parent)
    assert land_source.fn(str(config), "src").counts["inserted"] == 3
    assert land_source.fn(str(config), "src").counts["lines_read"] == 0, "nothing new: nothing read"
    downloads = tmp_path / "store" / "landing" / "src" / "job"
    downloads.mkdir(parents=True)  # what a bulk export in progress keeps

    refused = run_cli("--config", str(config), "reset", "src", check=False)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip() == (
        "error: reset would forget how far source 'src' got (1/1 files complete, 4 lines), so that its "
        "next sync reads everything again; no data is deleted. Add --yes to do it"
    )
    assert connect(tmp_path / "store").sql("SELECT count(*) FROM sync_state").fetchone() == (1,)

    done = run_cli("--config", str(config), "reset", "src", "--yes", env={"COLUMNS": "80"})
    assert "forgot how far it got; its next sync reads everything again" in " ".join(done.stdout.split())
    con = connect(tmp_path / "store")
    assert con.sql("SELECT count(*) FROM sync_state").fetchone() == (0,)
    assert con.sql("SELECT flow, status FROM ingest_run ORDER BY started_at DESC LIMIT 1").fetchall() == [
        ("reset", "succeeded")
    ]
    assert con.sql("SELECT count(*) FROM patient").fetchone() == (3,), "no data deleted"
    assert not downloads.parent.exists()
    con.close()

    reread = land_source.fn(str(config), "src").counts
    assert (reread["lines_read"], reread["unchanged"], reread["inserted"], reread["updated"]) == (4, 3, 0, 0)
    con = connect(tmp_path / "store")
    assert con.sql("SELECT count(*), count(DISTINCT id), max(version_id) FROM fhir_resource").fetchone() == (
        3,
        3,
        1,
    )
    assert con.sql("SELECT count(*) FROM quarantine").fetchone() == (1,), "the bad line is kept once"


@pytest.mark.slow
def test_the_sync_summary_says_what_waits_what_was_released_the_messages_and_the_models(
    tmp_path: Path, api_env: dict[str, str]
) -> None:
    mrn = "http://hospital.example.org/mrn"
    (tmp_path / "in.hl7").write_text(MESSAGE.replace("MRN123", "M-7"))
    jane = {"resourceType": "Patient", "id": "jane", "identifier": [{"system": mrn, "value": "M-7"}]}
    write_ndjson(tmp_path / "ehr" / "Patient.ndjson", [jane])
    (tmp_path / "twinhub.toml").write_text(
        f'[store]\npath = "{tmp_path / "store"}"\n\n[models]\nenabled = ["ascvd-pce"]\n\n'
        f'[[sources]]\nname = "labs"\nkind = "hl7v2"\npath = "{tmp_path / "in.hl7"}"\n'
        f'create_patients = false\npatient_systems = {{ ACME = "{mrn}" }}\n\n'
        f'[[sources]]\nname = "ehr"\nkind = "fhir-ndjson"\npath = "{tmp_path / "ehr"}"\n'
    )

    def sync(name: str) -> str:
        result = run_cli("--config", str(tmp_path / "twinhub.toml"), "sync", name, env=api_env)
        return " ".join(result.stdout.split())

    labs = sync("labs")  # a report, its specimen and three results wait for Jane
    assert "1 message (5 records) read -> 0 new, 0 updated, 0 unchanged, 0 quarantined, " in labs
    assert "5 waiting for their patient in" in labs and "files 1" in labs and "messages" not in labs
    assert "model ascvd-pce 1.0.0: 0 patients (full) -> 0 computed, 0 refused, 0 errors" in labs
    ehr = sync("ehr")
    assert "1 line read -> 6 new, 0 updated, 0 unchanged, 0 quarantined, 5 released" in ehr
    assert "model ascvd-pce 1.0.0: 1 patient (changed) -> 0 computed, 1 refused, 0 errors" in ehr


@pytest.mark.slow
def test_serve_registers_each_projects_deployments_apart_and_stops_on_sigterm(
    tmp_path: Path, api_env: dict[str, str]
) -> None:
    """Two projects on one Prefect server, each with a source named `served`: each gets its own
    deployment, named and tagged after its project (by default its config's folder)."""
    from prefect.client.orchestration import get_client

    configs = {
        project: write_config(tmp_path / project, tmp_path / "export", name="served", schedule="0 2 * * *")
        for project in ("cardio", "oncology")
    }
    procs = [
        subprocess.Popen(
            [TWINHUB, "--config", str(config), "serve"],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **api_env},
        )
        for config in configs.values()
    ]
    found = {}
    try:
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while len(found) < 2 and time.monotonic() < deadline and all(p.poll() is None for p in procs):
                for project in set(configs) - set(found):
                    try:
                        found[project] = client.read_deployment_by_name(f"sync/served@{project}")
                    except Exception:
                        time.sleep(0.5)
        assert set(found) == set(configs), [p.stdout.read() if p.stdout else "" for p in procs if p.poll()]
        for project, deployment in found.items():
            assert deployment.parameters == {"source": "served", "config": str(configs[project].resolve())}
            assert set(deployment.tags) == {"twinhub", f"project:{project}", "source:served"}
            assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]  # type: ignore[union-attr]
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=60) for proc in procs] == [0, 0]
