"""Prometheus metrics of the runs in a RunStore, computed at scrape time.

A collector rather than module-level gauges: a run forgotten by the store disappears from /metrics,
so the run_id label set stays bounded by `RunStore.max_runs`. Names follow
`esper_<domain>_<what>_<unit>`; counters end in `_total`.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from esper.karn.store import RunStore

# (metric name, help, value of the last EpochReport)
EPOCH_GAUGES = (
    ("esper_run_val_accuracy_percent", "Validation accuracy at the last epoch.", lambda e: e.signals.val_accuracy),
    ("esper_run_train_accuracy_percent", "Training accuracy at the last epoch.", lambda e: e.signals.train_accuracy),
    ("esper_run_val_loss", "Validation loss at the last epoch.", lambda e: e.signals.val_loss),
    ("esper_run_train_loss", "Training loss at the last epoch.", lambda e: e.signals.train_loss),
    ("esper_run_epoch", "Epochs completed.", lambda e: e.signals.epoch),
    ("esper_run_epoch_duration_seconds", "Wall time of the last epoch.", lambda e: e.epoch_seconds),
    ("esper_run_params", "Host plus seed parameters.", lambda e: e.signals.total_params),
)


class RunStoreCollector:
    def __init__(self, store: RunStore, malformed: dict[str, int] | None = None):
        self.store = store
        self.malformed = malformed if malformed is not None else {}
        """Reason -> frames the subscriber dropped: its own dict (fixed keys), read at scrape time."""

    def collect(self):
        store = self.store
        gauges = {name: GaugeMetricFamily(name, help_, labels=["run_id"]) for name, help_, _ in EPOCH_GAUGES}
        seeds = GaugeMetricFamily("esper_run_seeds", "Slots by seed stage at the last epoch.",
                                  labels=["run_id", "stage"])
        decisions = CounterMetricFamily("esper_run_decisions", "Controller decisions by operation.",
                                        labels=["run_id", "operation"])
        finished = GaugeMetricFamily("esper_run_finished", "1 once the run has finished.", labels=["run_id"])
        lost = CounterMetricFamily("esper_karn_events_lost", "Events missed, from sequence gaps.",
                                   labels=["run_id"])
        received = CounterMetricFamily("esper_karn_events_received", "Events applied to the run store.",
                                       labels=["kind"])
        with store.lock:
            for run in store.runs.values():
                last = run.last_epoch
                if last is not None:
                    for name, _, value in EPOCH_GAUGES:
                        gauges[name].add_metric([run.run_id], value(last))
                for stage, n in run.seeds_by_stage().items():
                    seeds.add_metric([run.run_id, stage], n)
                for op, n in run.decisions.items():
                    decisions.add_metric([run.run_id, op], n)
                finished.add_metric([run.run_id], float(run.finished is not None))
                lost.add_metric([run.run_id], run.lost)
            for kind, n in store.received.items():
                received.add_metric([kind], n)
            duplicates, implausible = store.duplicates, store.implausible
        yield from gauges.values()
        yield from (seeds, decisions, finished, lost, received)
        yield CounterMetricFamily("esper_karn_events_duplicate", "Events seen twice (snapshot overlap), dropped.",
                                  value=duplicates)
        yield CounterMetricFamily("esper_karn_events_implausible",
                                  "Events dropped: a sequence number past any its run could reach (a corrupt peer).",
                                  value=implausible)
        dropped = CounterMetricFamily("esper_karn_frames_malformed", "Bus frames dropped as malformed.",
                                      labels=["reason"])
        for reason, n in self.malformed.items():
            dropped.add_metric([reason], n)
        yield dropped
