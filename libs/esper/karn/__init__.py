"""Karn: consumes telemetry: keeps a store of runs and exports their metrics to Prometheus."""

from esper.karn.metrics import RunStoreCollector
from esper.karn.store import RunRecord, RunStore

__all__ = ["RunRecord", "RunStore", "RunStoreCollector"]
