"""The connector test infrastructure itself: a real sekmet FHIR server, and the FaultProxy in front of it."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.support.fault_proxy import FaultProxy, free_port

if TYPE_CHECKING:  # imported as a plugin (below) first, so pytest rewrites its asserts
    from tests.support.fhir_server import FhirServer, SekmetTemplate

pytest_plugins = ["tests.support.fhir_server"]


@pytest.fixture(scope="module")
def shared_server(
    sekmet_template: SekmetTemplate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FhirServer]:
    """One server for the tests that only read: a server start per test would dominate their runtime."""
    server = sekmet_template.spawn(tmp_path_factory.mktemp("shared-sekmet"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(shared_server: FhirServer) -> Iterator[FaultProxy]:
    with FaultProxy(shared_server.root_url) as p:
        yield p


@pytest.fixture
def client(proxy: FaultProxy, shared_server: FhirServer) -> Iterator[httpx.Client]:
    """The kind of client a connector uses, talking to the server only through the proxy."""
    with httpx.Client(base_url=proxy.base_url, headers=shared_server.admin_headers, timeout=30) as c:
        yield c


def without_meta(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "meta"}


# ---- the server ----


def test_template_server_holds_exactly_the_generated_dataset(
    sekmet_template: SekmetTemplate, fhir_server: FhirServer
) -> None:
    assert sekmet_template.count > 2500
    assert len(sekmet_template.types) == 7

    dumped = fhir_server.dump(sekmet_template.types)

    assert dumped.keys() == sekmet_template.keys
    assert dict(sorted(Counter(t for t, _ in dumped).items())) == sekmet_template.counts
    assert all(without_meta(dumped[k]) == without_meta(r) for k, r in sekmet_template.resources.items())
    assert {r["meta"]["versionId"] for r in dumped.values()} == {"1"}


def test_servers_are_independent_copies_and_keep_data_across_restart(
    sekmet_template: SekmetTemplate, fhir_server: FhirServer, tmp_path: Path
) -> None:
    patient = {"resourceType": "Patient", "id": "added-by-test", "gender": "female"}
    stored = fhir_server.put(patient)
    assert stored["meta"]["versionId"] == "1"
    gone = next(k for k in sekmet_template.keys if k[0] == "Observation")
    fhir_server.delete(*gone)
    port = fhir_server.port

    fhir_server.restart()

    assert fhir_server.port == port
    after = fhir_server.dump(sekmet_template.types)
    assert after.keys() == (sekmet_template.keys - {gone}) | {("Patient", "added-by-test")}
    with fhir_server.client() as c:
        assert c.get(f"{gone[0]}/{gone[1]}").status_code == 410
        assert c.get("Patient").status_code == 200
    with httpx.Client(base_url=fhir_server.base_url) as anonymous:
        assert anonymous.get("Patient").status_code == 401

    other = sekmet_template.spawn(tmp_path / "other")
    try:
        assert other.dump(sekmet_template.types).keys() == sekmet_template.keys
    finally:
        other.stop()


# ---- the proxy ----


def test_proxy_relays_with_content_length_and_rewrites_links_to_itself(
    proxy: FaultProxy, client: httpx.Client, sekmet_template: SekmetTemplate
) -> None:
    url: str | None = "Observation?_count=400"
    seen: set[str] = set()
    pages = 0
    while url:
        response = client.get(url)
        assert response.status_code == 200
        assert "transfer-encoding" not in response.headers
        assert response.headers["content-length"] == str(len(response.content))
        bundle = response.json()
        seen.update(e["resource"]["id"] for e in bundle["entry"])
        assert all(e["fullUrl"].startswith(proxy.base_url + "/Observation/") for e in bundle["entry"])
        url = next((x["url"] for x in bundle["link"] if x["relation"] == "next"), None)
        assert url is None or url.startswith(proxy.base_url + "/Observation?")
        pages += 1

    assert len(seen) == sekmet_template.counts["Observation"]
    assert pages == -(-len(seen) // 400)
    assert proxy.outcomes() == [200] * pages
    assert proxy.upstream.encode() not in response.content


def test_429_carries_retry_after_then_the_next_request_passes(
    proxy: FaultProxy, client: httpx.Client
) -> None:
    proxy.add_fault("429", match="/Patient", retry_after=3)

    throttled = client.get("Patient", params={"_count": 1})
    assert throttled.status_code == 429
    assert throttled.headers["retry-after"] == "3"
    assert throttled.json()["resourceType"] == "OperationOutcome"
    assert client.get("Patient", params={"_count": 1}).status_code == 200
    assert proxy.outcomes() == ["429", 200]
    assert proxy.injected == {"429": 1}


def test_503_then_pass_and_faults_only_hit_matching_requests(proxy: FaultProxy, client: httpx.Client) -> None:
    proxy.add_fault("503", match=re.compile(r"^/fhir/Encounter\?"), times=2)

    assert client.get("Patient", params={"_count": 1}).status_code == 200
    assert client.get("Encounter", params={"_count": 1}).status_code == 503
    assert client.get("Encounter", params={"_count": 1}).status_code == 503
    assert client.get("Encounter", params={"_count": 1}).status_code == 200
    assert proxy.outcomes() == [200, "503", "503", 200]
    assert proxy.injected == {"503": 2}


def test_drop_sends_full_content_length_but_a_truncated_body(proxy: FaultProxy, client: httpx.Client) -> None:
    proxy.add_fault("drop", match="Observation")

    with client.stream("GET", "Observation", params={"_count": 200}) as response:
        assert response.status_code == 200
        announced = int(response.headers["content-length"])
        received = bytearray()
        with pytest.raises(httpx.RemoteProtocolError):
            for chunk in response.iter_raw():
                received += chunk
    assert 0 < len(received) < announced

    complete = client.get("Observation", params={"_count": 200})
    assert complete.status_code == 200
    assert len(complete.content) == int(complete.headers["content-length"])
    assert proxy.outcomes() == ["drop", 200]


def test_reset_gives_a_transport_error_then_the_next_request_passes(
    proxy: FaultProxy, client: httpx.Client
) -> None:
    proxy.add_fault("reset")

    with pytest.raises(httpx.TransportError):
        client.get("Patient", params={"_count": 1})
    assert client.get("Patient", params={"_count": 1}).status_code == 200
    assert proxy.outcomes() == ["reset", 200]


def test_slow_delays_the_response_only_once(proxy: FaultProxy, client: httpx.Client) -> None:
    proxy.add_fault("slow", delay=0.5)

    started = time.monotonic()
    assert client.get("Patient", params={"_count": 1}).status_code == 200
    delayed = time.monotonic() - started
    started = time.monotonic()
    assert client.get("Patient", params={"_count": 1}).status_code == 200
    assert delayed >= 0.5 > time.monotonic() - started
    assert proxy.injected == {"slow": 1}


def test_bulk_export_urls_point_at_the_proxy(proxy: FaultProxy, client: httpx.Client) -> None:
    kickoff = client.get("Patient/$export", params={"_type": "Patient"}, headers={"Prefer": "respond-async"})
    assert kickoff.status_code == 202
    status_url = kickoff.headers["content-location"]
    assert status_url.startswith(proxy.base_url + "/bulk-status/")

    deadline = time.monotonic() + 15
    while (status := client.get(status_url)).status_code == 202 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status.status_code == 200
    [output] = status.json()["output"]
    assert output["url"].startswith(proxy.base_url + "/bulk-files/")
    assert client.get(output["url"]).text.count("\n") == output["count"] == 60


def test_writes_pass_through_and_location_is_rewritten(
    fault_proxy: FaultProxy, fhir_server: FhirServer
) -> None:
    with httpx.Client(base_url=fault_proxy.base_url, headers=fhir_server.admin_headers) as c:
        created = c.put("Patient/via-proxy", json={"resourceType": "Patient", "id": "via-proxy"})
    assert created.status_code == 201
    assert created.headers["location"] == f"{fault_proxy.base_url}/Patient/via-proxy/_history/1"
    assert ("Patient", "via-proxy") in fhir_server.dump(["Patient"])


def test_unreachable_upstream_is_a_502() -> None:
    with FaultProxy(f"http://127.0.0.1:{free_port()}") as proxy:
        response = httpx.get(f"{proxy.base_url}/metadata")
    assert response.status_code == 502
    assert response.json()["resourceType"] == "OperationOutcome"
