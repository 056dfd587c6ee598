"""A loopback HTTP/1.1 reverse proxy that injects faults, to test how EHR connectors cope with a bad network.

It sits between the client under test and a real server. Responses are buffered and always carry a
Content-Length (never chunked), so a client can tell a truncated body from a complete one. The upstream
origin is rewritten to the proxy's in bodies and Location headers, so followed links (Bundle next links,
$export status and file URLs) keep going through the proxy.
"""

from __future__ import annotations

import contextlib
import gzip
import re
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httpx
import orjson

FAULT_KINDS = frozenset({"401", "429", "500", "503", "drop", "slow", "reset", "gzip"})
# Per-connection headers (RFC 9110 7.6.1) are not relayed; Host and the body framing are set anew.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
REQUEST_SKIP = HOP_BY_HOP | {"accept-encoding"}  # sent as identity, so bodies can be rewritten
RESPONSE_SKIP = HOP_BY_HOP | {"content-encoding"}  # httpx hands over the decoded body
JSON = ("Content-Type", "application/fhir+json")


def free_port() -> int:
    """A loopback port that was free a moment ago, e.g. for a proxy whose url a server must know first."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ProxyRequest(NamedTuple):
    """One request seen by the proxy: the upstream status, or the fault kind that replaced the response."""

    method: str
    path: str
    outcome: int | str


@dataclass
class _Fault:
    kind: str
    match: str | re.Pattern[str]
    remaining: int
    opts: dict[str, Any]

    def matches(self, target: str) -> bool:
        if isinstance(self.match, re.Pattern):
            return self.match.search(target) is not None
        return self.match in target


def _outcome(code: str, text: str) -> bytes:
    return orjson.dumps(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text}],
        }
    )


class FaultProxy:
    """Forwards everything to `upstream` (a server root such as http://127.0.0.1:8090) until told to fail.

    `add_fault(kind, match=..., times=...)` makes the next `times` requests whose path+query matches fail:
    - "429": answers 429 with Retry-After (opts: retry_after=1) without contacting upstream;
    - "401": answers 401, as for an access token the server no longer accepts;
    - "500": answers 500 with an OperationOutcome saying the work failed (not transient);
    - "503": answers 503 (opts: retry_after adds a Retry-After header) without contacting upstream;
    - "drop": forwards, sends the headers with the full Content-Length but only part of the body
      (opts: after_bytes, default half), then closes the connection;
    - "slow": waits (opts: delay=2 seconds; on_hold, a callable run first) before forwarding;
    - "reset": resets the connection without any response;
    - "gzip": not a fault: the body goes gzip-encoded when the client accepts gzip.
    `match` is a substring of the path+query, or a compiled regex; "" matches every request.
    """

    def __init__(self, upstream: str, *, port: int = 0, timeout: float = 120.0) -> None:
        parts = urlsplit(upstream)
        self.upstream = f"{parts.scheme}://{parts.netloc}"
        self.requests: list[ProxyRequest] = []
        self.injected: Counter[str] = Counter()
        self.credentials: set[str] = set()
        """Every token or basic pair sent in an Authorization header: secrets a test can hunt for."""
        self.authorized: list[str] = []
        """Paths of the requests that carried an Authorization header."""
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        # trust_env=False: loopback traffic must not take a detour through an HTTP(S)_PROXY from the env
        self._client = httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False)
        handler = type("Handler", (_Handler,), {"proxy": self})
        self._server = _Server(("127.0.0.1", port), handler)
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fault-proxy", daemon=True
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"{self.url}/fhir"

    def add_fault(self, kind: str, *, match: str | re.Pattern[str] = "", times: int = 1, **opts: Any) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        with self._lock:
            self._faults.append(_Fault(kind, match, times, opts))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def outcomes(self) -> list[int | str]:
        """Just the outcome column of `requests`, for compact assertions."""
        with self._lock:
            return [r.outcome for r in self.requests]

    def close(self) -> None:
        """Stops accepting, and cuts kept-alive connections so clients cannot keep using a dead proxy."""
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._client.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- used by the handler threads ----

    def _take_fault(self, target: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.matches(target):
                    fault.remaining -= 1
                    self.injected[fault.kind] += 1
                    return fault
        return None

    def _record(self, method: str, path: str, outcome: int | str) -> None:
        with self._lock:
            self.requests.append(ProxyRequest(method, path, outcome))

    def _rewrite(self, data: bytes) -> bytes:
        return data.replace(self.upstream.encode(), self.url.encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up (say, on its own timeout during a "slow" fault) is not an error here."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    proxy: FaultProxy  # set on the per-proxy subclass
    protocol_version = "HTTP/1.1"  # keep-alive, like a real server

    def setup(self) -> None:
        super().setup()
        with self.proxy._lock:
            self.proxy._connections.add(self.connection)

    def finish(self) -> None:
        with self.proxy._lock:
            self.proxy._connections.discard(self.connection)
        with contextlib.suppress(OSError):  # the client or a fault already tore the connection down
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the proxy's own log is `FaultProxy.requests`."""

    def _handle(self) -> None:
        body = self._read_body()
        if credentials := self.headers.get("Authorization"):
            with self.proxy._lock:
                self.proxy.credentials.add(credentials.partition(" ")[2])
                self.proxy.authorized.append(self.path)
        fault = self.proxy._take_fault(self.path)
        kind = fault.kind if fault else None
        if fault is not None and kind == "reset":
            self.proxy._record(self.command, self.path, "reset")
            self._abort(reset=True)
            return
        if fault is not None and kind in ("401", "429", "500", "503"):
            self.proxy._record(self.command, self.path, fault.kind)
            self._refuse(fault)
            return
        if fault is not None and kind == "slow":
            if on_hold := fault.opts.get("on_hold"):
                on_hold()
            time.sleep(float(fault.opts.get("delay", 2)))
        try:
            upstream = self._forward(body)
        except httpx.HTTPError as e:
            self.proxy._record(self.command, self.path, 502)
            self._send(502, [JSON], _outcome("transient", f"proxy could not reach upstream: {e}"))
            return
        content = self.proxy._rewrite(upstream.content)
        headers = [
            (k, self._relay_header(k, v))
            for k, v in upstream.headers.multi_items()
            if k.lower() not in RESPONSE_SKIP
        ]
        if kind == "gzip" and "gzip" in self.headers.get("Accept-Encoding", ""):
            content = gzip.compress(content)
            headers.append(("Content-Encoding", "gzip"))
        if fault is not None and kind == "drop":
            self.proxy._record(self.command, self.path, "drop")
            cut = int(fault.opts.get("after_bytes", len(content) // 2))
            self._send(upstream.status_code, headers, content, send_bytes=min(cut, max(len(content) - 1, 0)))
            self._abort(reset=False)
            return
        self.proxy._record(self.command, self.path, upstream.status_code)
        length = upstream.headers.get("content-length") if self.command == "HEAD" else None
        self._send(upstream.status_code, headers, content, head_length=length)

    # BaseHTTPRequestHandler dispatches on these stdlib-chosen names
    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle  # noqa: N815

    def _refuse(self, fault: _Fault) -> None:
        headers = [JSON]
        if fault.kind == "429" or "retry_after" in fault.opts:
            headers.append(("Retry-After", str(fault.opts.get("retry_after", 1))))
        if fault.kind == "429":
            self._send(429, headers, _outcome("throttled", "Too many requests (injected by FaultProxy)"))
        elif fault.kind == "401":
            self._send(401, headers, _outcome("login", "Access token expired (injected by FaultProxy)"))
        elif fault.kind == "500":
            self._send(500, headers, _outcome("exception", "It failed for good (injected by FaultProxy)"))
        else:
            self._send(503, headers, _outcome("transient", "Service unavailable (injected by FaultProxy)"))

    def _relay_header(self, name: str, value: str) -> str:
        if name.lower() in ("location", "content-location"):
            return self.proxy._rewrite(value.encode()).decode()
        return value

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes) -> httpx.Response:
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in REQUEST_SKIP]
        headers.append(("Accept-Encoding", "identity"))
        return self.proxy._client.request(
            self.command, self.proxy.upstream + self.path, headers=headers, content=body or None
        )

    def _send(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        content: bytes,
        *,
        send_bytes: int | None = None,
        head_length: str | None = None,
    ) -> None:
        """Status, headers with an exact Content-Length, then the body (or its first `send_bytes`)."""
        self.send_response_only(status)
        for k, v in headers:
            self.send_header(k, v)
        has_body = self.command != "HEAD" and status >= 200 and status not in (204, 304)
        if has_body:
            self.send_header("Content-Length", str(len(content)))
        elif head_length is not None:
            self.send_header("Content-Length", head_length)
        self.end_headers()
        if has_body:
            self.wfile.write(content if send_bytes is None else content[:send_bytes])
        self.wfile.flush()

    def _abort(self, *, reset: bool) -> None:
        """Ends the connection now: with a FIN after what was sent, or (reset) with a bare TCP RST."""
        self.close_connection = True
        if not reset:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_WR)
            return
        # SO_LINGER 0 turns close() into a RST; rfile (a makefile) keeps the socket open until it is closed
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()
        self.connection.close()
