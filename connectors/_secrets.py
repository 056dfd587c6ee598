"""Secrets a source needs (tokens, keys, passwords): read from a file or an environment variable
named in the config, never from the config itself, and written only to files its owner alone
can read. They live in memory only: no log line, error or store row holds one."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from connectors.errors import SourceError


def refuse_inline_secrets(data: Any, keys: tuple[str, ...]) -> Any:
    """A config table's raw `data`, unless it holds one of the secret `keys` itself."""
    if isinstance(data, dict):
        for key in keys:
            if key in data:
                raise ValueError(
                    f"secrets never go in the config file: remove `{key}` and put it in a file "
                    f"(`{key}_file = ...`) or an environment variable (`{key}_env = ...`)"
                )
    return data


def read_secret(source: str, what: str, file: Path | None, env: str | None, *, key: str = "auth.") -> str:
    """A secret from exactly one of a file (first line) or an environment variable; `key` is
    where the setting lives, for the messages."""
    if (file is None) == (env is None):
        raise SourceError(source, f"set exactly one of {key}{what}_file or {key}{what}_env")
    if env is not None:
        value = os.environ.get(env, "").strip()
        if not value:
            raise SourceError(source, f"environment variable {env} ({key}{what}_env) is not set or empty")
        return value
    assert file is not None
    try:
        value = file.read_text().strip()
    except OSError as e:
        raise SourceError(
            source, f"cannot read {key}{what}_file {str(file)!r} ({e.strerror}); check the path"
        ) from None
    if not value:
        raise SourceError(source, f"{key}{what}_file {str(file)!r} is empty")
    return value


def write_private(path: Path, blob: bytes) -> None:
    """Write `path` whole or not at all: a temporary file (0600), fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    part = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        part.replace(path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
