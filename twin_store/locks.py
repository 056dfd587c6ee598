"""The store's two kinds of lock: files under the store folder that say who holds them (what,
which source and run, pid, since when; never patient data), so whoever waits can say for whom.

- The store lock (`writer.lock`) is held only while the store is written: opening or migrating
  it, and each batch's transaction. A sync that waits on a remote system (an export in progress,
  a rate limit) holds nothing, so an MLLP listener and other sources land meanwhile.
- A source's run lock (`locks/<source>.lock`) is held for a whole run of that source, waits
  included: two runs of one source never interleave (their watermarks would).

Both are `flock`s: the kernel drops them when the process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import orjson
from xxhash import xxh3_64_hexdigest

from connectors.errors import StoreError

log = logging.getLogger(__name__)

STORE_LOCK = "writer.lock"
RUN_LOCKS = "locks"


@dataclass(kw_only=True)
class Holder:
    """What a lock's holder is doing, as the lock file records it."""

    what: str
    """"sync", "backfill", "listen", "refresh model x", "twinhub" (opening the store), ..."""
    source: str | None = None
    run_id: str | None = None
    pid: int = field(default_factory=os.getpid)
    since: str = ""

    def describe(self) -> str:
        """`sync of ehr (run 20261207T190211-1a2b3c4d, pid 1234) holds it since 19:02:11 UTC`."""
        who = f"{self.what} of {self.source}" if self.source else self.what
        run = f"run {self.run_id}, " if self.run_id else ""
        since = f" since {self.since[11:19]} UTC" if len(self.since) >= 19 else ""
        return f"{who} ({run}pid {self.pid}) holds it{since}"


class FileLock:
    """An exclusive lock on `path` that records its holder; `name` says what it guards
    ("the store", "source 'ehr'") in what waiters log and in the error when they give up."""

    def __init__(self, path: Path, name: str, timeout: float) -> None:
        self.path, self.name, self.timeout = path, name, timeout
        self._fh: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def acquire(self, holder: Holder) -> None:
        """Take the lock, waiting up to `timeout` seconds; once, as it starts to wait, log who
        holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+")
        deadline, told = time.monotonic() + self.timeout, False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                other = self.holder()
                who = other.describe() if other else "another twinhub process holds it"
                if time.monotonic() >= deadline:
                    fh.close()
                    raise StoreError(
                        f"{self.name} is busy: {who}; waited {self.timeout:g} s for "
                        f"{str(self.path.parent)!r}, run again when it is done (readers like "
                        "`twinhub sql` are never blocked)"
                    ) from None
                if not told:
                    told = True
                    log.warning("waiting for %s: %s", self.name, who)
                time.sleep(0.1)
        holder.since = str(datetime.now(UTC))
        fh.seek(0)
        fh.truncate()
        fh.write(orjson.dumps(asdict(holder)).decode())
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the file drops the flock
            self._fh = None

    @contextlib.contextmanager
    def holding(self, holder: Holder) -> Iterator[None]:
        self.acquire(holder)
        try:
            yield
        finally:
            self.release()

    def holder(self) -> Holder | None:
        """Who holds the lock, as its file says (None: unknown, or nobody)."""
        try:
            return Holder(**orjson.loads(self.path.read_bytes()))
        except (OSError, ValueError, TypeError):
            return None

    def free(self) -> bool:
        """Whether nobody holds the lock now (a run whose lock is free has ended)."""
        if self.held:
            return False
        try:
            with self.path.open("a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True  # closing it drops the lock again
        except BlockingIOError:
            return False
        except OSError:
            return True


def store_lock(root: Path, timeout: float) -> FileLock:
    return FileLock(root / STORE_LOCK, "the store", timeout)


def run_lock(root: Path, source: str, timeout: float) -> FileLock:
    """The lock of `source`'s runs; the file is named after the source (made safe as a file name)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", source)[:60]
    return FileLock(
        root / RUN_LOCKS / f"{safe}-{xxh3_64_hexdigest(source)[:8]}.lock", f"source {source!r}", timeout
    )
