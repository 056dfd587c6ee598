"""The twin store: raw FHIR, the standard views as tables, quarantine and run bookkeeping in DuckLake."""

from connectors.base import Window
from twin_store.prepare import PreparedBatch, prepare
from twin_store.store import RunReport, TwinStore, connect
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
