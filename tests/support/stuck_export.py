"""A Bulk Data server whose export never finishes: the kick-off answers 202 with a status URL,
and the status stays 202 "in progress" (Retry-After 1) forever. A sync of it waits, as one of a
big export does for hours."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StuckExport(ThreadingHTTPServer):
    polls = 0
    """Status polls so far: from the second on, the sync is waiting."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/fhir"


class _Handler(BaseHTTPRequestHandler):
    server: StuckExport

    def do_GET(self) -> None:
        if self.path.endswith("/metadata"):  # the check before a sync
            body = b'{"resourceType": "CapabilityStatement", "status": "active", "kind": "instance"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if "$export" in self.path:
            self.send_response(202)
            self.send_header("Content-Location", f"http://127.0.0.1:{self.server.server_port}/status/1")
        else:
            self.server.polls += 1
            self.send_response(202)
            self.send_header("X-Progress", "still exporting")
            self.send_header("Retry-After", "1")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_DELETE(self) -> None:
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def stuck_export() -> Iterator[StuckExport]:
    server = StuckExport(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
