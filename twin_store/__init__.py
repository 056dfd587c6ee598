"""The twin store: raw FHIR, the standard views as tables, variant calls, wearable samples and
their daily rollups, twin model outputs, quarantine and run bookkeeping, in one DuckLake under one
folder. `TwinStore` is the one writer; `connect` opens it read-only for anyone else; `queries`
holds what the CLI shows."""

from connectors.base import Window
from twin_store.connection import connect
from twin_store.prepare import PreparedBatch, prepare
from twin_store.runs import RunReport
from twin_store.store import TwinStore
from twin_store.views import standard_views, view_relation

__all__ = [
    "PreparedBatch",
    "RunReport",
    "TwinStore",
    "Window",
    "connect",
    "prepare",
    "standard_views",
    "view_relation",
]
