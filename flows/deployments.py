"""All deployments in one place: one scheduled `sync` per source that has a `schedule`."""

from __future__ import annotations

import contextlib
import signal
from types import FrameType

from prefect import serve

from connectors.errors import ConfigError
from flows.config import Settings
from flows.sync import sync


def serve_sources(settings: Settings, config: str | None) -> None:
    scheduled = [s for s in settings.sources if s.schedule]
    if not scheduled:
        raise ConfigError(
            "sources.schedule",
            'no source has a schedule; add e.g. `schedule = "0 2 * * *"` to a [[sources]] table',
        )
    deployments = [
        sync.to_deployment(
            name=f"sync-{s.name}",
            cron=s.schedule,
            parameters={"source": s.name, "config": config},
            tags=["twinhub", f"source:{s.name}"],
        )
        for s in scheduled
    ]

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt):
        serve(*deployments)  # type: ignore[arg-type]
