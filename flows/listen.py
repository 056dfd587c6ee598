"""`twinhub listen NAME`: a live source's listener (an hl7v2 source's MLLP port), landing what it
receives.

Each batch received lands in its own run and transaction, with the store lock held only while
it lands, so syncs into the same store go on between batches, and a sync that waits on its
server (an export in progress) holds nothing that would delay an ACK.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from connectors.base import Batch
from connectors.errors import ConfigError
from connectors.kinds import Context, kind_names, source_kind
from flows.config import load_settings, mapping_files
from harmonize.formats import harmonizer
from twin_store import TwinStore, prepare


def listen(config: Path | None, name: str, *, ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM."""
    settings = load_settings(config)
    source = settings.source(name)
    kind = source_kind(source.kind)
    if kind.listen is None:
        live = ", ".join(k for k in kind_names() if source_kind(k).listen is not None)
        raise ConfigError(
            f"sources.{name}.kind", f"a {source.kind} source cannot listen; these kinds can: {live}"
        )
    listener = kind.listen(source, Context(store=settings.store.path))
    harmonize = harmonizer(kind.records, source, mapping_files(source))

    with TwinStore(settings.store.path) as store:  # opened once: the store lock is taken per batch

        def land(received: Batch) -> Mapping[int, str]:
            (batch,) = harmonize(iter([received]))
            run = store.begin_run(source.name, "sync")
            try:
                run.stats.update(batch.stats)
                store.land(run, prepare(batch))
            except BaseException as e:
                store.finish_run(run, "failed", error=f"{type(e).__name__}: {e}")
                raise
            store.finish_run(run, "succeeded")
            return dict(
                zip(batch.problems["line_no"].to_pylist(), batch.problems["reason"].to_pylist(), strict=True)
            )

        listener.listen(land, ready=ready)
