"""An MLLP listener: HL7 v2 messages over TCP, each acknowledged only once it is safe.

Messages from all connections are gathered into batches (up to `max_batch`, or what arrived
within `max_wait` seconds) and handed to `land`, which stores them in one transaction and says
which failed and why. Only then does each sender get its ACK: `AA`, `AE` with the reason (the
message was quarantined) or `AR` (not an HL7 message at all). A sender that gets no ACK (the
listener died first) sends again; the store lands a resend once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from hl7.mllp import start_hl7_server
from hl7.mllp.exceptions import InvalidBlockError

from connectors.base import Batch, records_from
from connectors.errors import ConfigError, SourceError
from connectors.kinds import Land as LandBatch

log = logging.getLogger(__name__)

Land = Callable[[list[tuple[int, str]]], dict[int, str]]
"""(sequence number, message) pairs in; the reasons of those that failed out."""


class MllpListener:
    """An hl7v2 source's listener: each batch of messages received, as records to land."""

    def __init__(self, source: str, host: str, port: int | None) -> None:
        if port is None:
            raise ConfigError(
                f"sources.{source}.port", "an hl7v2 source needs `port = 2575` (0: any) to listen"
            )
        self.source, self.host, self.port = source, host, port

    def listen(self, land: LandBatch, *, ready: Callable[[int], None] | None = None) -> None:
        origin = f"mllp://{self.host}:{self.port}"

        def land_messages(messages: list[tuple[int, str]]) -> dict[int, str]:
            records = records_from([(origin, n, message) for n, message in messages])
            return dict(land(Batch(records=records, watermark={})))

        async def main() -> None:
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                asyncio.get_running_loop().add_signal_handler(sig, stop.set)
            await serve(self.source, self.host, self.port, land_messages, ready=ready, stop=stop)

        asyncio.run(main())


@dataclass
class _Pending:
    seq: int
    text: str
    done: asyncio.Future[str | None] = field(repr=False)


async def serve(
    source: str,
    host: str,
    port: int,
    land: Land,
    *,
    max_batch: int = 500,
    max_wait: float = 0.2,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Listen until `stop` is set; `ready` gets the bound port (0 asks the OS for a free one)."""
    queue: asyncio.Queue[_Pending] = asyncio.Queue()
    numbers = itertools.count(1)

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    block = await reader.readblock()  # type: ignore[attr-defined]
                except InvalidBlockError:
                    log.warning("dropped a frame from %s that is not an MLLP block", peer)
                    continue
                text = block.decode("utf-8", errors="backslashreplace")
                pending = _Pending(next(numbers), text, asyncio.get_running_loop().create_future())
                await queue.put(pending)
                reason = await pending.done
                writer.writeblock(ack(text, reason).encode())  # type: ignore[attr-defined]
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the sender hung up
        finally:
            writer.close()

    async def batches() -> None:
        while True:
            batch = [await queue.get()]
            deadline = asyncio.get_running_loop().time() + max_wait
            while len(batch) < max_batch and (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except TimeoutError:
                    break
            try:
                failed = await asyncio.to_thread(land, [(p.seq, p.text) for p in batch])
            except Exception as e:  # nothing landed: no ACK, the senders will resend
                log.error("landing %d messages failed (%s); closing their connections", len(batch), e)
                for pending in batch:
                    pending.done.set_exception(ConnectionError(str(e)))
                continue
            for pending in batch:
                pending.done.set_result(failed.get(pending.seq))

    try:
        server = await start_hl7_server(connection, host=host, port=port)
    except OSError as e:  # in use, not ours to take, or no such address
        raise SourceError(
            source,
            f"cannot listen on {host}:{port} ({os.strerror(e.errno) if e.errno else e}); stop what "
            "holds the port or set another `port`",
        ) from None
    batcher = asyncio.create_task(batches())
    try:
        if ready:
            ready(server.sockets[0].getsockname()[1])
        await (stop or asyncio.Event()).wait()
    finally:
        server.close()
        batcher.cancel()


def ack(message: str, reason: str | None) -> str:
    """The ACK for `message`: AA, AE with the reason, or AR where it is no HL7 message."""
    segments = message.replace("\n", "\r").split("\r")
    msh = segments[0] if segments and segments[0].startswith("MSH") and len(segments[0]) > 8 else None
    if msh is None:
        code, fields, separator = "AR", [], "|"
        reason = reason or "not an HL7 v2 message (it does not start with MSH)"
    else:
        separator, fields = msh[3], msh.split(msh[3])
        code = "AE" if reason else "AA"

    def field(n: int) -> str:  # MSH-n; MSH-1 is the separator itself
        return fields[n - 1] if len(fields) >= n else ""

    trigger = field(9).split("^")[1] if "^" in field(9) else ""
    encoding = field(2) or "^~\\&"
    kind = f"ACK^{trigger}^ACK" if trigger else "ACK"
    now = f"{datetime.now(UTC):%Y%m%d%H%M%S+0000}"
    header = [
        "MSH",
        encoding,
        field(5),
        field(6),
        field(3),
        field(4),
        now,
        "",
        kind,
        f"ACK{field(10)}"[:20],
        field(11) or "P",
        field(12) or "2.5.1",
    ]
    lines = [separator.join(header), separator.join(["MSA", code, field(10), _escape(reason or "")])]
    if reason:
        error = ["ERR", "", "", "207^Application internal error^HL70357", "E", "", "", "", _escape(reason)]
        lines.append(separator.join(error))
    return "\r".join(lines) + "\r"


def _escape(text: str) -> str:
    for char, escape in (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        text = text.replace(char, escape)
    return text.replace("\r", " ").replace("\n", " ")
