"""`esper tui` attached to a real hub: a late joiner shows the epochs published before it started
(the snapshot) and those after (live), each once, and quits cleanly while the bus is still up."""

from __future__ import annotations

import asyncio

from procs import metric, scrape, start_hub, wait_until
from textual.widgets import Sparkline

from esper.karn.tui import make_app
from esper.leyline import EpochReport, SlotState, TelemetryEvent, TrainingSignals
from esper.transport.bus import PublisherSink, make_context
from esper.transport.follow import BusFollower


def epoch(sequence: int) -> TelemetryEvent:
    return TelemetryEvent(run_id="live", sequence=sequence, epoch=EpochReport(
        signals=TrainingSignals(epoch=sequence, max_epochs=40, val_accuracy=float(sequence)),
        slots=[SlotState(slot="mid", stage=1)]))


def test_tui_late_joins_the_bus(spawn):
    hub = start_hub(spawn)
    ctx = make_context()
    publisher = PublisherSink(hub.endpoints["publish"], ctx)
    assert publisher.wait_attached(30.0)
    for seq in range(1, 21):
        publisher.emit(epoch(seq))
    wait_until(lambda: metric(scrape(hub.endpoints["metrics"]), "esper_bus_messages_forwarded_total") == 20,
               30, "the hub to forward 20 events")

    async def main():
        app = make_app(BusFollower(hub.endpoints["subscribe"], hub.endpoints["snapshot"]))
        async with app.run_test(size=(120, 40)) as pilot:
            async def until(condition):
                for _ in range(1500):
                    if condition():
                        return
                    await pilot.pause(0.02)
                raise AssertionError(f"timed out; store has {dict(app.store.received)}")

            await until(lambda: app.store.received["epoch"] == 20)
            # 15..20 again, as a snapshot overlapping the live stream repeats them: each must count once
            for seq in [*range(15, 21), *range(21, 31)]:
                publisher.emit(epoch(seq))
            await until(lambda: app.store.received["epoch"] + app.store.duplicates == 36)
            assert (app.store.received["epoch"], app.store.duplicates) == (30, 6)  # each once
            assert app.query_one("#val_accuracy", Sparkline).data == [float(s) for s in range(1, 31)]
            assert app.store.runs["live"].lost == 0
            await pilot.press("q")

    try:
        asyncio.run(main())
    finally:  # a failed check must not leave the publisher's socket open for the tests after it
        publisher.shutdown()
        ctx.term()
    assert hub.stop() == 0, hub.output()
