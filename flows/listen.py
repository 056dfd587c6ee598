"""`twinhub listen NAME`: an hl7v2 source's MLLP listener, landing what it receives.

Each batch of messages lands in its own run and transaction, with the writer lock held only
while it lands, so scheduled syncs into the same store go on between batches.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

from connectors.base import Batch, records_from
from connectors.errors import ConfigError
from connectors.labs.hl7v2 import Hl7v2Source
from connectors.labs.mllp import serve
from flows.config import code_map, load_settings
from harmonize.labs.hl7v2 import resources_from_messages
from twin_store import TwinStore, prepare


def listen(config: Path | None, name: str, *, ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM."""
    settings = load_settings(config)
    source = settings.source(name)
    if not isinstance(source, Hl7v2Source) or source.port is None:
        raise ConfigError(f"sources.{name}.port", "an hl7v2 source needs `port = 2575` (0: any) to listen")
    store_path = settings.store.path
    codes = code_map(source)

    def land(messages: list[tuple[int, str]]) -> dict[int, str]:
        origin = f"mllp://{source.host}:{source.port}"
        records = records_from([(origin, n, message) for n, message in messages])
        batch = resources_from_messages(Batch(records=records, watermark={}), source, codes)
        with TwinStore(store_path) as store:
            run = store.begin_run(source.name, "sync")
            run.stats.update(batch.stats)
            store.land(run, prepare(batch))
            store.finish_run(run, "succeeded")
        return dict(
            zip(batch.problems["line_no"].to_pylist(), batch.problems["reason"].to_pylist(), strict=True)
        )

    async def main() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await serve(source.host, source.port or 0, land, ready=ready, stop=stop)

    asyncio.run(main())
