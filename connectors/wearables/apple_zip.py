"""Where an Apple Health export's XML is read from: a zip's export.xml members, read in place
(no unpacking to disk), or the file itself (plain or gzipped).

A zip cut short has lost its central directory (its list of members, at the end): it is read
front to back instead, member by member from their own headers (stream-unzip), and the export's
stream breaks off where the zip does, so the records before the cut still land.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast

from isal import isal_zlib
from stream_unzip import UnzipError, stream_unzip

from connectors._files import open_maybe_gzipped

READ_SIZE = 1 << 20
EXPORT_MEMBER = "export.xml"
READ_ERRORS = (OSError, EOFError, zlib.error, cast("type[Exception]", isal_zlib.error), zipfile.BadZipFile)
"""What reading a damaged file (zip, gzip) raises part way."""


class RefusedError(Exception):
    """A file that cannot be read at all (hostile, not an export, not a zip): raised before
    any record of it is read."""

    def __init__(self, origin: str, reason: str) -> None:
        super().__init__(f"{origin} {reason}")
        self.origin = origin


def exports(path: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """(origin, stream) of each export.xml in the file: a zip's members are read in place."""
    if not path.name.endswith(".zip"):
        with open_maybe_gzipped(path) as stream:
            yield str(path), stream
        return
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        with path.open("rb") as fh:
            local_header = fh.read(4) == b"PK\x03\x04"
        if local_header:  # a zip that starts as one but has lost its end: read up to the cut
            yield from _cut_zip(path)
            return
        raise RefusedError(
            str(path), f"is not a readable zip ({e}); export again from the Health app"
        ) from None
    with archive:
        members = [
            m
            for m in archive.infolist()
            if PurePosixPath(m.filename).name == EXPORT_MEMBER and not m.filename.startswith("__MACOSX/")
        ]
        if not members:
            raise RefusedError(
                str(path),
                f"holds no {EXPORT_MEMBER}; the Health app's export.zip has apple_health_export/export.xml",
            )
        for member in members:
            origin = f"{path}!/{member.filename}"
            try:
                stream = archive.open(member)
            except (*READ_ERRORS, NotImplementedError) as e:
                raise RefusedError(
                    origin, f"cannot be unpacked ({e}); export again from the Health app"
                ) from None
            with stream:
                yield origin, stream


def _cut_zip(path: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """(origin, stream) of each export.xml of a zip without its central directory, read front to
    back from the members' own headers; a member's stream breaks off (EOFError) where the zip does."""
    found = False
    with path.open("rb") as fh:
        members = stream_unzip(iter(lambda: fh.read(READ_SIZE), b""))
        try:
            for raw_name, _, content in members:
                name = raw_name.decode(errors="replace")
                if PurePosixPath(name).name == EXPORT_MEMBER and not name.startswith("__MACOSX/"):
                    found = True
                    # Unbuffered: a buffered read that meets the cut loses what it had gathered.
                    with _Unzipped(content) as stream:
                        yield f"{path}!/{name}", cast(IO[bytes], stream)
                for _ in content:  # the rest of the member (stream-unzip reads them in order)
                    pass
        except (UnzipError, *READ_ERRORS) as e:
            if not found:
                raise RefusedError(
                    str(path),
                    f"is not a readable zip (it breaks off before its {EXPORT_MEMBER}: {type(e).__name__}); "
                    "export again from the Health app",
                ) from None
            return  # the export's own stream reported the cut
    if not found:
        raise RefusedError(
            str(path),
            f"holds no {EXPORT_MEMBER}; the Health app's export.zip has apple_health_export/export.xml",
        )


class _Unzipped(io.RawIOBase):
    """A member's chunks from stream-unzip as a stream; a damaged zip ends it with EOFError."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.rest = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.rest:
            try:
                self.rest = next(self.chunks)
            except StopIteration:
                return 0
            except (UnzipError, *READ_ERRORS) as e:
                raise EOFError(f"the zip breaks off here ({type(e).__name__})") from None
        n = min(len(buffer), len(self.rest))
        buffer[:n] = self.rest[:n]
        self.rest = self.rest[n:]
        return n
