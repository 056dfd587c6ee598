"""A file's lines, read so that nothing in the file can stop a sync: a damaged gzip stream ends
the lines with a problem naming where, a line over the size limit is quarantined without ever
being held whole, and a file that vanished or cannot be read is one problem. The caller lands
the lines and hands the problems to quarantine (`Batch.problems`)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, cast

from isal import isal_zlib

from connectors._files import GZIP_MAGIC

RAW_KEPT = 64 << 10
"""How much of a damaged or over-long line a problem keeps (its `raw`)."""
READ_SIZE = 1 << 20
COMPRESSED_READ = 16 << 10
"""Small, so that corrupt data loses little of what was decompressed before it."""


class DamagedError(Exception):
    """Data that cannot be read, in words that name no content."""


DAMAGE = (EOFError, OSError, zlib.error, cast("type[Exception]", isal_zlib.error), DamagedError)
"""What reading a damaged file raises: a truncated or corrupt gzip stream, a disk error."""

Problem = tuple[str, int, str, str]
"""(file, line_no, reason, raw), as `connectors.base.problems_from` takes them."""


def unreadable(path: Path, error: OSError) -> Problem:
    """A file that vanished or cannot be opened between listing and reading: one problem."""
    why = error.strerror or type(error).__name__
    return (
        str(path),
        0,
        f"file cannot be read ({why}); nothing of it landed; make it readable and sync again",
        "",
    )


class FileLines:
    """The lines of one file (plain or gzip), in chunks, in bounded memory."""

    def __init__(self, path: Path, *, max_line: int, option: str | None = None) -> None:
        self.path = path
        self.max_line = max_line
        self.option = option
        """The source option that sets `max_line`, if one does: named in the reason of a line over it."""
        self.opened = False
        """Whether the file could be opened (if not, it is read again at the next sync)."""

    def chunks(self, skip: int = 0, hint: int = 4 << 20) -> Iterator[tuple[int, list[bytes], Problem | None]]:
        """(number of the first line, about `hint` bytes of lines without their line end, and
        a problem at the line after them or None), after the first `skip` lines. A line over
        `max_line` bytes and the damage that ends a file are problems; a file that cannot be
        opened is one problem at line 0."""
        try:
            fh = self.path.open("rb")
        except OSError as e:
            yield 1, [], unreadable(self.path, e)
            return
        self.opened = True
        with fh:
            head = fh.peek(RAW_KEPT)[:RAW_KEPT]
            if head.startswith(GZIP_MAGIC):
                yield from self._split(_gunzipped(fh), skip, hint)
            elif self.path.name.endswith(".gz") and not _text(head):
                reason = "file is named .gz but is neither gzip nor text; replace the file and sync again"
                yield 1, [], self._problem(1, reason, b"") if skip < 1 else None
            else:
                yield from self._split(iter(lambda: fh.read(READ_SIZE), b""), skip, hint)

    def _split(
        self, pieces: Iterator[bytes], skip: int, hint: int
    ) -> Iterator[tuple[int, list[bytes], Problem | None]]:
        lines: list[bytes] = []  # the lines not yet yielded, from line `first`
        first, size = 1, 0
        tail: list[bytes] = []  # the line being read, in pieces (its first 64 KiB once over)
        tail_size = 0
        over = False  # the line being read is over max_line: the rest of it is not kept
        start = 0  # byte offset (of the content) where the line being read starts
        while True:
            try:
                chunk = next(pieces, b"")
            except DAMAGE as e:
                line_no = first + len(lines)
                at = f"after line {line_no - 1:,}" if line_no > 1 else "at its start"
                reason = (
                    f"file damaged {at} (byte {start:,}): {_what(e)}; the lines before it landed; "
                    "replace the file and sync again"
                )
                yield first, lines, self._problem(line_no, reason, _head(tail)) if line_no > skip else None
                return
            if not chunk:
                break
            parts = chunk.split(b"\n")
            # A chunk no longer than a line may be: only the line it continues (its first part)
            # can be over, so the whole lines between its first and last part go in at once.
            whole = parts[1:-1] if len(chunk) <= self.max_line else []
            for n, part in enumerate(parts[:1] + parts[len(whole) + 1 :]):
                if n == 1 and whole:
                    # Their bytes: the chunk's, less its first and last part and the line ends.
                    wholes_size = len(chunk) - len(parts[0]) - len(parts[-1]) - len(parts) + 1
                    if skipped := min(len(whole), max(0, skip + 1 - (first + len(lines)))):
                        first += skipped  # lines skipped come before any kept: `lines` is empty
                        size -= sum(map(len, whole[:skipped]))
                    lines += whole[skipped:]
                    size += wholes_size
                    start += wholes_size + len(whole)
                    if size >= hint:
                        yield first, lines, None
                        first, lines, size = first + len(lines), [], 0
                if not over and tail_size + len(part) > self.max_line:
                    over, tail = True, [_head([*tail, part])]
                elif not over:
                    tail.append(part)
                tail_size += len(part)
                if n == len(parts) - len(whole) - 1:  # the chunk ends inside this line
                    break
                line_no = first + len(lines)
                start += tail_size + 1
                if over:
                    problem = self._too_long(line_no, tail_size, tail[0])
                    yield first, lines, problem if line_no > skip else None
                    first, lines, size = line_no + 1, [], 0
                elif line_no > skip:
                    line = tail[0] if len(tail) == 1 else b"".join(tail)
                    lines.append(line)
                    size += len(line)
                    if size >= hint:
                        yield first, lines, None
                        first, lines, size = first + len(lines), [], 0
                else:
                    first += 1
                tail, tail_size, over = [], 0, False
        line_no = first + len(lines)
        if over:
            yield first, lines, self._too_long(line_no, tail_size, tail[0]) if line_no > skip else None
        elif tail_size and line_no > skip:  # the last line, without a line end
            yield first, [*lines, b"".join(tail)], None
        elif lines:
            yield first, lines, None

    def _too_long(self, line_no: int, size: int, kept: bytes) -> Problem:
        mb, limit = size / (1 << 20), self.max_line >> 20
        if self.option is None:
            reason = (
                f"line {line_no:,} is {mb:,.1f} MB, over the {limit} MB a line may have; "
                "its first 64 KiB are kept"
            )
        else:
            reason = (
                f"line {line_no:,} is {mb:,.1f} MB, over the source's {self.option} = {limit}; "
                f"its first 64 KiB are kept; raise {self.option} to land it"
            )
        return self._problem(line_no, reason, kept)

    def _problem(self, line_no: int, reason: str, raw: bytes) -> Problem:
        return (str(self.path), line_no, reason, raw[:RAW_KEPT].decode(errors="backslashreplace"))


def _gunzipped(fh: IO[bytes]) -> Iterator[bytes]:
    """The content of a gzip file (each member in turn: bgzip writes many), in pieces. Unlike
    a GzipFile, whose read loses what it decompressed when the stream then fails, every byte
    before the damage comes out; the damage raises EOFError (cut short), `isal_zlib.error`
    (corrupt) or `DamagedError` (not gzip after a member)."""
    inflate, started, pending = isal_zlib.decompressobj(wbits=31), False, b""
    while True:
        if not pending:
            pending = fh.read(COMPRESSED_READ)
            if not pending:
                if started:
                    raise EOFError("cut short")
                return
        if not started:
            if not pending.strip(b"\0"):  # zero padding after the last member
                pending = b""
                continue
            if len(pending) >= 2 and not pending.startswith(GZIP_MAGIC):
                raise DamagedError("data that is not gzip follows the end of a gzip stream")
            started = True
        out = inflate.decompress(pending, READ_SIZE)
        if inflate.eof:
            inflate, started, pending = isal_zlib.decompressobj(wbits=31), False, inflate.unused_data
        else:
            pending = inflate.unconsumed_tail
        if out:
            yield out


def _text(head: bytes) -> bool:
    """Whether the start of a file is text (a file named .gz by mistake, or noise)."""
    try:
        head.decode()
    except UnicodeDecodeError as e:
        return e.start > len(head) - 4  # a character cut at the end of the sample is fine
    return True


def _head(pieces: list[bytes]) -> bytes:
    """The first RAW_KEPT bytes of a line in pieces, without joining all of it."""
    kept, size = [], 0
    for piece in pieces:
        kept.append(piece[: RAW_KEPT - size])
        size += len(kept[-1])
        if size >= RAW_KEPT:
            break
    return b"".join(kept)


def _what(error: BaseException) -> str:
    """What is wrong with the data, in words (no content: zlib's messages name no data)."""
    if isinstance(error, EOFError):
        return "truncated gzip stream (it ends before its end marker)"
    if isinstance(error, OSError) and error.strerror:
        return f"read error ({error.strerror})"
    if "checksum" in str(error).lower():
        return "the gzip checksum does not match (lines before it may be damaged too)"
    if isinstance(error, DamagedError):
        return str(error)
    return f"corrupt gzip data ({error})"
