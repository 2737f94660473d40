"""Accuracy and loss of the run that reported an epoch last, as sparklines with their latest values."""

from __future__ import annotations


from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Sparkline

from esper.karn.store import RunRecord

# (id, title, value of an EpochReport, format)
SERIES = (
    ("val_accuracy", "val accuracy", lambda r: r.signals.val_accuracy, "{:.2f}%"),
    ("train_accuracy", "train accuracy", lambda r: r.signals.train_accuracy, "{:.2f}%"),
    ("val_loss", "val loss", lambda r: r.signals.val_loss, "{:.4f}"),
    ("train_loss", "train loss", lambda r: r.signals.train_loss, "{:.4f}"),
)


DRAWABLE = 1e300
"""The largest magnitude a Sparkline is given: two values past it (a reward of 1.7e308 and one of -1.7e308) span
more than a float, and the line's scale (inf / inf) had ended the app in int(NaN)."""


def finite(values: list[float]) -> list[float]:
    """What a Sparkline can draw (it takes int() of every value) and a best can be taken over: a diverged
    epoch's NaN or inf loss, or a value past DRAWABLE, is left out of the line, and shown in the label as the
    latest value."""
    return [v for v in values if abs(v) <= DRAWABLE]


def latest_and_best(title: str, fmt: str, values: list[float], best) -> str:
    drawn = finite(values)
    return f"{title} {fmt.format(values[-1])}  (best {fmt.format(best(drawn)) if drawn else 'n/a'})"


class Curves(Vertical):
    """The curves of the run that reported an epoch last: one run's history at a time reads clearly, and a PPO
    round's interleaved episodes would otherwise draw one meaningless line."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_id = ""

    def compose(self) -> ComposeResult:
        for key, title, _, _ in SERIES:
            yield Label(title, id=f"{key}-label", classes="curve-label")
            yield Sparkline([], id=key, summary_function=max)

    def show_run(self, run: RunRecord) -> None:
        """Draw `run`'s epochs as karn's store holds them (the last report of each: a governor rollback
        re-reports an epoch; at most MAX_EPOCHS)."""
        self.run_id = run.run_id
        reports = [run.epochs[e] for e in sorted(run.epochs)]
        for key, title, value, fmt in SERIES:
            values = [value(r) for r in reports]
            self.query_one(f"#{key}", Sparkline).data = finite(values)
            self.query_one(f"#{key}-label", Label).update(
                latest_and_best(title, fmt, values, max if "accuracy" in key else min))
