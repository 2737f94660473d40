"""Nissa: builds telemetry events at a chosen level and hands them to sinks (a JSONL file, a list, or
the bus: esper.transport.bus.PublisherSink); `nissa.diagnostics` holds the measurements only the DEBUG
level pays for (gradient health per layer and seed, loss sharpness)."""

from esper.nissa.telemetry import JsonlSink, ListSink, Sink, Telemetry, new_run_id, read_jsonl

__all__ = ["JsonlSink", "ListSink", "Sink", "Telemetry", "new_run_id", "read_jsonl"]
