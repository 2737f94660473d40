"""What the dashboard page shows, folded from telemetry events and told to pages as JSON messages.

Runs, epochs, duplicates and sequence gaps are karn's `RunStore`, the same fold the TUI and the karn
service use; this module adds only what the page shows beyond it (PPO updates, alerts) and the JSON
the page reads. A page gets every change as a small message, and on (re)connect one `snapshot` message
that holds the messages which rebuild the whole state: the page has one code path for both, and a
page that missed messages (a restart, a slow connection dropped) is made whole by reconnecting.

Messages (`type` first):
- `run`: run, mode, task, seed, device, lost (events missed: sequence gaps), finished (null, or
  val_accuracy, test_accuracy, total_params, wall_seconds, epochs)
- `epoch`: run, epoch, max_epochs, val/train accuracy and loss, total_params, and slots: slot, stage (at
  the epoch's end), trained_stage (during it: what the timeline draws), alpha, blueprint, seed_id,
  epochs_in_stage, contribution and contribution_se (null until measured)
- `ppo`: run, update, episodes, global_step, entropy (and entropy_fraction of the run's first
  update), approx_kl, clipfrac, explained_variance, losses, nonfinite_skipped, and health: gauge ->
  green|yellow|red by the TUI's thresholds (`esper.karn.tui.widgets.policy_health.HEALTH`)
- `alert`: run, kind (governor | cull | gap | nonfinite: an update's minibatches not stepped on), time
  (the event's wall time), text
"""

from __future__ import annotations

from collections import deque

from rich.text import Text

from esper.karn.store import RunRecord, RunStore
from esper.karn.tui.widgets.event_log import describe
from esper.karn.tui.widgets.policy_health import health_colour
from esper.leyline import (
    Blueprint,
    EpochReport,
    PPOUpdate,
    SeedStage,
    TelemetryEvent,
    enum_name,
)


class DashboardState:
    """Not thread-safe: the server folds every event on its event-loop thread."""

    def __init__(self, max_runs: int = 64, max_updates: int = 2000, max_alerts: int = 200):
        self.store = RunStore(max_runs)
        self.updates: deque[dict] = deque(maxlen=max_updates)
        self.alerts: deque[dict] = deque(maxlen=max_alerts)
        self.first_entropy: dict[str, float] = {}
        """Run id -> its first PPO update's entropy: health reads entropy as a fraction of it."""

    def apply(self, event: TelemetryEvent) -> list[dict]:
        """Fold one event; the messages that tell a page what changed (none for a duplicate)."""
        lost_before = self.store.runs[event.run_id].lost if event.run_id in self.store.runs else 0
        if not self.store.apply(event):
            return []
        run = self.store.runs[event.run_id]
        messages = []
        if run.lost > lost_before:
            messages.append(self._alert(event, "gap", f"{run.lost - lost_before} events missed before "
                                                      f"sequence {event.sequence}"))
        kind = event.WhichOneof("payload")
        if kind == "epoch":
            messages.append(epoch_message(run.run_id, event.epoch))
        elif kind == "ppo_update":
            messages.append(self._ppo(event.run_id, event.ppo_update))
            if skipped := event.ppo_update.nonfinite_skipped:
                messages.append(self._alert(event, "nonfinite", f"update {event.ppo_update.update}: {skipped} "
                                                                "minibatches not stepped on: gradient not finite"))
        elif kind == "governor" or (kind == "transition" and event.transition.to_stage == SeedStage.SEED_STAGE_CULLED):
            messages.append(self._alert(event, "governor" if kind == "governor" else "cull",
                                        Text.from_markup(describe(event)).plain))
        if kind in ("run_started", "run_finished") or run.lost > lost_before:
            messages.insert(0, run_message(run))
        return messages

    def snapshot(self) -> dict:
        """One message that rebuilds everything a page shows."""
        messages = []
        for run in list(self.store.runs.values()):
            messages.append(run_message(run))
            messages += [epoch_message(run.run_id, run.epochs[e]) for e in sorted(run.epochs)]
        return {"type": "snapshot", "messages": messages + list(self.updates) + list(self.alerts)}

    def _ppo(self, run_id: str, u: PPOUpdate) -> dict:
        first = self.first_entropy.setdefault(run_id, u.entropy)
        gauges = {"entropy": u.entropy / first if first > 0 else 1.0, "approx_kl": u.approx_kl,
                  "clipfrac": u.clipfrac, "explained_variance": u.explained_variance}
        message = {"type": "ppo", "run": run_id, "update": u.update, "episodes": u.episodes,
                   "global_step": u.global_step, "entropy": u.entropy, "entropy_fraction": gauges["entropy"],
                   "approx_kl": u.approx_kl, "clipfrac": u.clipfrac, "explained_variance": u.explained_variance,
                   "policy_loss": u.policy_loss, "value_loss": u.value_loss, "grad_norm": u.grad_norm,
                   "early_stopped": u.early_stopped, "nonfinite_skipped": u.nonfinite_skipped,
                   "steps_per_second": u.steps_per_second,
                   "health": {name: health_colour(name, value) for name, value in gauges.items()}}
        self.updates.append(message)
        return message

    def _alert(self, event: TelemetryEvent, kind: str, text: str) -> dict:
        message = {"type": "alert", "run": event.run_id, "kind": kind, "time": event.wall_time, "text": text}
        self.alerts.append(message)
        return message


def run_message(run: RunRecord) -> dict:
    s, f = run.started, run.finished
    return {"type": "run", "run": run.run_id, "mode": s.mode if s else "", "task": s.task if s else "",
            "seed": s.seed if s else None, "device": s.device if s else "", "lost": run.lost,
            "finished": None if f is None else {
                "val_accuracy": f.val_accuracy,
                "test_accuracy": f.test_accuracy if f.HasField("test_accuracy") else None,  # a PPO episode's: none
                "total_params": f.total_params, "wall_seconds": f.wall_seconds, "epochs": f.epochs}}


def epoch_message(run_id: str, report: EpochReport) -> dict:
    s = report.signals
    return {"type": "epoch", "run": run_id, "epoch": s.epoch, "max_epochs": s.max_epochs,
            "val_accuracy": s.val_accuracy, "train_accuracy": s.train_accuracy, "val_loss": s.val_loss,
            "train_loss": s.train_loss, "total_params": s.total_params,
            "slots": [{"slot": slot.slot, "stage": enum_name(SeedStage, slot.stage), "alpha": slot.alpha,
                       "trained_stage": enum_name(SeedStage, report.trained_stages.get(slot.slot, slot.stage)),
                       "blueprint": enum_name(Blueprint, slot.blueprint) if slot.blueprint else None,
                       "seed_id": slot.seed_id, "epochs_in_stage": slot.epochs_in_stage,
                       "contribution": slot.contribution if slot.has_contribution else None,
                       "contribution_se": slot.contribution_se if slot.has_contribution else None}
                      for slot in report.slots]}
