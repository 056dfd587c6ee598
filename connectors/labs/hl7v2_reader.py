"""A file of HL7 v2 messages read as a stream: a megabyte at a time, message by message, with
whatever is damaged told apart from what is not.

A message starts at MSH, or after a message boundary (an MLLP frame mark or a blank line); its
segments are lines whose name is a segment id (three capitals or digits). What is damaged comes
out as a `Message` with a `problem` (the reason, naming the message, line and byte, never the
content) and its text, bounded, for quarantine:

- text between messages that is no HL7 segment, on its own (the messages around it are kept);
  inside a message, the whole message (it cannot map whole);
- a message with bytes that are not UTF-8 (or not the character set its MSH-18 names);
- a message with a segment over MAX_SEGMENT bytes (the rest of that segment is skipped unread);
- the last message of a file cut short: an MLLP frame never closed, a gzip stream that ends too
  soon or cannot be read on, or a file of several messages that stops in mid-segment.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from isal import isal_zlib  # zlib-compatible, about twice as fast

from connectors._files import GZIP_MAGIC

CHUNK = 1 << 20
GZIP = 31
"""zlib's wbits for a gzip stream (header and trailer checked)."""
UNREADABLE = (OSError, cast(type[Exception], isal_zlib.error))
"""What reading a damaged gzip stream raises (isal's error is no OSError)."""
MAX_SEGMENT = 16 << 20
"""A segment longer than this (16 MiB; an ED result of a scanned report stays well below) is
damage, not data: the message is quarantined and the reader never holds the rest of it."""
MAX_RAW = 64 << 10
"""At most this much of a damaged message's text goes to quarantine."""
BOM = b"\xef\xbb\xbf"
START, END = b"\x0b", b"\x1c"
SEPARATOR = re.compile(rb"\r\n|\n|\r|\x0b|\x1c")
SEGMENT = re.compile(rb"[A-Z][A-Z0-9]{2}(?:[^A-Za-z0-9\s]|$)")
CHARSETS = {"ASCII": "ascii", "UNICODE UTF-8": "utf-8", "UNICODE": "utf-8"} | {
    f"8859/{n}": f"iso8859-{n}" for n in (*range(1, 11), 13, 14, 15)
}
"""MSH-18 values (HL7 table 0211) a message may name, as Python codecs; any other: UTF-8."""


@dataclass
class Message:
    """One message (or run of text that is none) of a file: `number` its place in the file,
    `line` and `byte` where it starts; `problem` None when it is whole."""

    number: int
    line: int
    byte: int
    text: str = ""
    problem: str | None = None


@dataclass
class _Lines:
    """Lines being gathered: a message's segments (or text that is no message, `junk`)."""

    line: int
    byte: int
    junk: bool = False
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    damage: str | None = None

    def add(self, text: bytes) -> None:
        """Keep a line; of a run that will be quarantined, only its first MAX_RAW bytes."""
        if not (self.junk or self.damage) or self.size < MAX_RAW:
            self.parts.append(text)
            self.size += len(text)


def read_messages(path: Path) -> Iterator[Message]:
    """The messages of the file at `path` (plain or gzipped), in order, each read as it comes."""
    return _Reader().read(path)


class _Reader:
    def __init__(self) -> None:
        self.number = 0
        self.line, self.byte = 1, 0
        self.message: _Lines | None = None
        self.junk: _Lines | None = None  # text after the message's segments, not yet judged
        self.framed = False  # inside an MLLP frame not yet closed
        self.ended = 0  # messages ended by a boundary or the next message
        self.skipping = False  # inside a segment over the limit
        self.out: list[Message] = []

    def read(self, path: Path) -> Iterator[Message]:
        parts: list[bytes] = []  # the line not finished yet, in pieces
        size, damage = 0, None
        try:
            for chunk in _chunks(path):
                if self.byte == 0 and not parts and chunk.startswith(BOM):
                    chunk, self.byte = chunk[len(BOM) :], len(BOM)
                if parts and not parts[-1].endswith(b"\r") and not SEPARATOR.search(chunk):
                    parts.append(chunk)  # a long line goes on: joined once, when it ends
                    size += len(chunk)
                else:
                    rest = self._lines(b"".join(parts) + chunk)
                    parts, size = [rest], len(rest)
                if size > MAX_SEGMENT:
                    self._oversized(b"".join(parts)[:MAX_RAW], size)
                    parts, size = [], 0
                yield from self._drain()
        except EOFError:
            damage = "the gzip stream ends too soon"
        except UNREADABLE as e:  # a gzip stream that cannot be read on
            damage = f"cannot be read on ({type(e).__name__}: {e})"
        pending = self._lines(b"".join(parts), final=True)
        where = f"at line {self.line:,} (byte {self.byte + len(pending):,})"
        ends_mid_segment = bool(pending.strip()) and not self.skipping
        if pending and not self.skipping:
            self._line(pending)
        reason = None
        if damage is not None:
            reason = f"file damaged {where}: {damage}"
        elif self.framed:
            reason = f"cut short: its MLLP frame never ends (the file ends {where})"
        elif ends_mid_segment and self.ended:  # its messages end with a segment end, but not this one
            reason = (
                f"cut short: the file stops in mid-segment {where}; the messages before it landed; "
                "replace the file (a whole one ends with a segment end, CR or LF) and sync again"
            )
        if reason and not reason.endswith("sync again"):
            reason += "; the messages before it landed; replace the file and sync again"
        self._end(reason)
        yield from self._drain()

    def _drain(self) -> Iterator[Message]:
        out, self.out = self.out, []
        return iter(out)

    def _lines(self, pending: bytes, *, final: bool = False) -> bytes:
        """Every whole line of `pending` read; the unfinished rest back (a trailing CR too,
        unless `final`: its LF may come with the next chunk)."""
        at, stop = 0, len(pending) - (pending.endswith(b"\r") and not final)
        for found in SEPARATOR.finditer(pending, 0, stop):
            self._line(pending[at : found.start()])
            mark = found.group()
            if mark in (START, END):
                self._flush()
                self.framed = mark == START
            else:
                self.line += 1
            self.byte += found.end() - at
            at = found.end()
        return pending[at:]

    def _line(self, text: bytes) -> None:
        """One line of the file (its end not included)."""
        if self.skipping:  # the rest of a segment over the limit
            self.skipping = False
        elif len(text) > MAX_SEGMENT:
            self._oversized(text[:MAX_RAW], len(text), ended=True)
        elif not text:
            self._flush()  # a blank line ends a message
        elif text.startswith(b"MSH"):
            self._flush()
            self.message = _Lines(self.line, self.byte)
            self.message.add(text)
        elif not SEGMENT.match(text) and text.strip():
            if self.message is not None and self.message.damage:
                self.message.add(text)
                return
            self.junk = self.junk or _Lines(self.line, self.byte, junk=True)
            self.junk.add(text)
        elif text.strip():
            if self.message is None:  # no MSH: after a boundary, or junk before it
                self._flush()
                self.message = _Lines(self.line, self.byte)
            elif self.junk is not None:  # text inside a message: it cannot map whole
                self.message.damage = f"line {self.junk.line:,} (byte {self.junk.byte:,}) is no HL7 segment"
                for part in self.junk.parts:
                    self.message.add(part)
                self.junk = None
            self.message.add(text)

    def _oversized(self, head: bytes, size: int, *, ended: bool = False) -> None:
        """A line of `size` bytes over the limit: the message it is in is damaged, its `head`
        kept for quarantine; the rest of it is skipped unread unless it has `ended`."""
        if not self.skipping:
            if self.message is None:
                self._flush()
                self.message = _Lines(self.line, self.byte)
            self.message.damage = self.message.damage or (
                f"line {self.line:,} (byte {self.byte:,}) is a segment over {MAX_SEGMENT >> 20} MiB; "
                "split the result or send it by reference"
            )
            self.message.add(head)
            self.skipping = not ended
        if not ended:
            self.byte += size

    def _flush(self) -> None:
        """End the message (and the junk after it) where a boundary or the next message starts."""
        if self.message is not None:
            self.ended += 1
        self._end(None)

    def _end(self, reason: str | None) -> None:
        """Emit what is gathered; `reason` (the file is cut short) goes to what came last."""
        message, junk, self.message, self.junk = self.message, self.junk, None, None
        if message is not None:
            self._emit(message, reason if junk is None else None)
        if junk is not None:
            self._emit(junk, reason)
        if reason and message is None and junk is None:
            self.number += 1
            self.out.append(Message(number=self.number, line=self.line, byte=self.byte, problem=reason))

    def _emit(self, lines: _Lines, cut: str | None) -> None:
        self.number += 1
        raw = b"\r".join(lines.parts)
        where = f"message {self.number} (line {lines.line:,}, byte {lines.byte:,})"
        problem = cut or lines.damage
        if lines.junk and not cut:
            problem = "text outside any message that is no HL7 v2 segment"
        text, bad = _decode(raw)
        if problem is None and bad is not None:
            problem = (
                f"its byte {bad + 1:,} is not {_charset(raw)}; send UTF-8 or name the character set in MSH-18"
            )
        if problem is not None:
            problem, text = f"{where}: {problem}", text[:MAX_RAW]
        self.out.append(
            Message(number=self.number, line=lines.line, byte=lines.byte, text=text, problem=problem)
        )


def _chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes, a megabyte at a time, gunzipped where it is gzip (every member). A
    gzip stream is inflated as it comes, so what precedes damage in it is read, not lost with
    the block it was in (as a gzip file object's read would lose it)."""
    with path.open("rb") as fh:
        data = fh.read(CHUNK)
        if not data.startswith(GZIP_MAGIC):
            while data:
                yield data
                data = fh.read(CHUNK)
            return
        inflate = isal_zlib.decompressobj(GZIP)
        while data:
            while data and not inflate.eof:
                if out := inflate.decompress(data, CHUNK):
                    yield out
                data = inflate.unconsumed_tail
            if inflate.eof:  # the next member, if there is one
                data = inflate.unused_data or fh.read(CHUNK)
                if data:
                    inflate = isal_zlib.decompressobj(GZIP)
            else:
                data = fh.read(CHUNK)
        if not inflate.eof:
            raise EOFError(path)


def _charset(raw: bytes) -> str:
    """The codec of a message: the character set its MSH-18 names, else UTF-8."""
    header = raw.split(b"\r", 1)[0]
    if header.startswith(b"MSH") and len(header) > 3:
        fields = header.split(header[3:4])
        if len(fields) > 17:
            named = fields[17].split(b"~")[0].strip().decode("ascii", "replace").upper()
            return CHARSETS.get(named, "utf-8")
    return "utf-8"


def _decode(raw: bytes) -> tuple[str, int | None]:
    """The text of a message, and where its first byte that is not of its character set is."""
    try:
        return raw.decode(_charset(raw)), None
    except UnicodeDecodeError as e:
        return raw.decode("utf-8", errors="backslashreplace"), e.start
