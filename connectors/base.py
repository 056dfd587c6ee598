"""The seam every connector plugs into: pull raw records, in batches, since a watermark."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

Watermark = dict[str, Any]
"""How far a source has landed. JSON-serializable; only the connector that wrote it reads it."""

RECORD_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string(), nullable=False),
        pa.field("line_no", pa.int64(), nullable=False),
        pa.field("raw", pa.string(), nullable=False),
        pa.field("bad_utf8", pa.bool_(), nullable=False),
    ]
)
"""Raw records as pulled: where each came from (file, 1-based line) and its text."""


@dataclass(frozen=True, kw_only=True)
class Batch:
    """Raw records plus the watermark that holds once they (and all before them) have landed."""

    records: pa.Table
    watermark: Watermark

    def __len__(self) -> int:
        return int(self.records.num_rows)


class Connector(Protocol):
    """A source of raw records. Flows know nothing else about a connector."""

    name: str

    def check(self) -> None:
        """Fail fast with a `SourceError` naming the fix when the source cannot be read."""
        ...

    def pull(self, since: Watermark | None) -> Iterator[Batch]:
        """Yield batches of records not yet landed after `since` (None: everything)."""
        ...
