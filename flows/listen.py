"""`twinhub listen NAME`: a live source's listener (an hl7v2 source's MLLP port), landing what it
receives.

Each batch received lands in its own run and transaction, with the writer lock held only while
it lands, so scheduled syncs into the same store go on between batches.
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

    def land(received: Batch) -> Mapping[int, str]:
        (batch,) = harmonize(iter([received]))
        with TwinStore(settings.store.path) as store:
            run = store.begin_run(source.name, "sync")
            run.stats.update(batch.stats)
            store.land(run, prepare(batch))
            store.finish_run(run, "succeeded")
        return dict(
            zip(batch.problems["line_no"].to_pylist(), batch.problems["reason"].to_pylist(), strict=True)
        )

    listener.listen(land, ready=ready)
