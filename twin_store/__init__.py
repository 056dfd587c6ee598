"""The twin store: raw FHIR, flat analyst tables, quarantine and run bookkeeping in DuckLake."""

from connectors.base import Window
from twin_store.flat import FLAT_TABLES
from twin_store.prepare import PreparedBatch, check_batch, derive_batch, prepare
from twin_store.store import RunReport, TwinStore, connect
from twin_store.views import view_relation

__all__ = [
    "FLAT_TABLES",
    "PreparedBatch",
    "RunReport",
    "TwinStore",
    "Window",
    "check_batch",
    "connect",
    "derive_batch",
    "prepare",
    "view_relation",
]
