"""Files a source names by its `path`: one file, a folder of them or a glob, read plain or
gzipped, and the fingerprint (size, mtime) that tells a sync whether a file changed."""

from __future__ import annotations

import glob
from collections import Counter
from pathlib import Path
from typing import IO, Any, Generic, Protocol, TypeVar, cast

from isal import igzip  # zlib-compatible, about twice as fast as gzip

from connectors.base import Watermark
from connectors.errors import SourceError

GZIP_MAGIC = b"\x1f\x8b"


class FileSourceConfig(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def path(self) -> Path: ...


S = TypeVar("S", bound=FileSourceConfig)


class FileConnector(Generic[S]):
    """What the connectors of local files share: their config, stats and the files they read."""

    suffixes: tuple[str, ...] = ()
    recursive = False
    """Whether a folder's subfolders are read too."""

    def __init__(self, source: S) -> None:
        self.name = source.name
        self.source = source
        self.stats: Counter[str] = Counter()

    def check(self) -> None:
        self.files()

    def files(self) -> list[Path]:
        """The files the configured path names, in a stable order."""
        return source_files(self.name, self.source.path, self.suffixes, recursive=self.recursive)


def source_files(
    source: str, path: Path, suffixes: tuple[str, ...], *, recursive: bool = False
) -> list[Path]:
    """The files `path` names, in a stable order: itself, a folder's files with one of
    `suffixes` (in subfolders too when `recursive`), or a glob's matches."""
    kinds = "/".join(suffixes)
    if glob.has_magic(str(path)):
        found = [Path(p) for p in glob.glob(str(path), recursive=True)]  # noqa: PTH207 (absolute globs)
    elif path.is_dir():
        found = [p for p in (path.rglob("*") if recursive else path.iterdir()) if p.name.endswith(suffixes)]
    elif path.is_file():
        found = [path]
    else:
        raise SourceError(
            source,
            f"path {str(path)!r} does not exist; point sources.path at a file, a folder of "
            f"{kinds} files or a glob",
        )
    found = sorted(p for p in found if p.is_file())
    if not found:
        raise SourceError(source, f"no {kinds} files at {str(path)!r}; check sources.path")
    return found


def fingerprint(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def resume_point(progress: dict[str, Any], path: Path, unit: str) -> int | None:
    """How many `unit`s (lines, rows) of `path` already landed, and mark it in progress; None
    when it landed whole and is unchanged. A changed file starts over."""
    now, seen = fingerprint(path), progress.get(str(path))
    same_file = seen is not None and all(seen[k] == v for k, v in now.items())
    if same_file and seen is not None and seen["complete"]:
        return None
    done = int(seen[unit]) if same_file and seen is not None else 0
    progress[str(path)] = {**now, unit: done, "complete": False}
    return done


def open_maybe_gzipped(path: Path) -> IO[bytes]:
    with path.open("rb") as probe:
        gzipped = probe.read(2) == GZIP_MAGIC
    if gzipped:
        return cast(IO[bytes], igzip.open(path, "rb"))  # type: ignore[no-untyped-call]
    return path.open("rb")


def describe_files(watermark: Watermark) -> str:
    """How far a source of files got: files read whole of those begun, and the lines (NDJSON) or
    data rows (CSV, whose header is no result) landed."""
    files = watermark.get("files", {}).values()
    # Files that land whole per batch (HL7 v2, VCF, wearable exports) keep no count or `complete` flag.
    done = sum(1 for f in files if f.get("complete", True))
    unit = "row" if any("rows" in f for f in files) else "line"
    count = sum(f.get("lines", f.get("rows", 0)) for f in files)
    return f"{done}/{len(files)} files complete" + (
        f", {count:,} {unit}{'s' * (count != 1)}" if count else ""
    )
