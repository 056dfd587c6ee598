"""The one error tree. Every stage imports it from here, the lowest stage."""

from __future__ import annotations

from urllib.parse import urlsplit


class TwinhubError(Exception):
    """Root of every error twinhub raises on purpose; the CLI prints these as one line."""


class ConfigError(TwinhubError):
    """A config key is missing or wrong. The message names the key and the fix."""

    def __init__(self, key: str, msg: str) -> None:
        super().__init__(f"config {key}: {msg}")
        self.key = key


class SourceError(TwinhubError):
    """A source cannot be read as configured (missing files, bad format)."""

    def __init__(self, source: str, msg: str) -> None:
        super().__init__(f"source {source!r}: {msg}")
        self.source = source


class TransientError(TwinhubError):
    """Safe to retry: timeouts, 429, 5xx, lock contention."""


class StoreError(TwinhubError):
    """The twin store cannot be opened or written as asked."""


class InterruptedRunError(TwinhubError):
    """A run stopped on request (Ctrl-C): its committed batches stay, and the next run resumes
    after them. Never retried."""

    def __init__(self, run_id: str, source: str, lines: int) -> None:
        super().__init__(
            f"interrupted: run {run_id} of {source} stopped after {lines:,} lines; the next sync resumes"
        )
        self.run_id = run_id


def safe_url(url: object) -> str:
    """A URL fit for logs and errors: no credentials, no query (it may hold search terms or a
    signed-URL token)."""
    parts = urlsplit(str(url))
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}" + ("?…" if parts.query else "")
