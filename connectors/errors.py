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


def safe_url(url: object) -> str:
    """A URL fit for logs and errors: no credentials, no query (it may hold search terms or a
    signed-URL token)."""
    parts = urlsplit(str(url))
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}" + ("?…" if parts.query else "")
