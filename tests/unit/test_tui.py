"""The TUI shows what the telemetry says: events from a real (tiny) synthetic run, fed through
`make_app` and driven with the pilot, end up in the panels."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from textual.widgets import HelpPanel, Label, Sparkline

from esper.karn.tui import QueueSource, make_app
from esper.karn.dashboard.state import DashboardState
from esper.karn.tui.widgets import Curves, EventLog, GradientHealth, PolicyHealth, Rewards, RunHeader, SlotTable
from esper.karn.tui.widgets.policy_health import health_colour
from esper.leyline import (Action, Blueprint, Decision, EpochReport, GateCheck, GovernorEvent, LayerGradient,
                           LifecycleTransition, Operation, PPOUpdate, RunStarted, SeedStage, SlotState, TelemetryEvent,
                           TrainingSignals, short_name)
from esper.nissa import ListSink, Telemetry
from esper.simic import EnvConfig, GrowthEnv, run_episode
from esper.tamiyo import HeuristicConfig, HeuristicPolicy
from esper.tolaria.trainer import TrainConfig

SIZE = (120, 40)


@pytest.fixture(scope="module")
def run_events() -> list[TelemetryEvent]:
    """14 short epochs over three slots, growing early: seeds germinate, train, blend and (in 'early')
    fossilize; about a second on one core."""
    from esper.tolaria.data import make_synthetic

    torch.set_num_threads(1)  # a module fixture runs before conftest's per-test thread setting
    sink = ListSink()
    cfg = EnvConfig(task="synthetic", max_epochs=14, slots=("early", "mid", "late"), train=TrainConfig(max_batches=5))
    env = GrowthEnv(cfg, make_synthetic(), torch.device("cpu"), Telemetry("tiny", sinks=[sink]))
    # Episode seed 0: its early seed fossilizes within the 14 epochs, so every stage has a row to show.
    run_episode(env, HeuristicPolicy(HeuristicConfig(min_epoch_to_germinate=3, plateau_patience=2)), 0)
    return sink.events


def screen_text(app) -> str:
    """The whole screen as plain text: what a user sees, at the test's fixed terminal size."""
    console = Console(width=app.size.width, height=app.size.height, file=io.StringIO(), record=True,
                      force_terminal=True, color_system=None)
    console.print(app.screen._compositor.render_update(full=True))
    return console.export_text()


async def replay(events, pilot_fn, size=SIZE):
    app = make_app(iter(events), title="test")
    async with app.run_test(size=size) as pilot:
        deadline = time.monotonic() + 60
        while not app.source_ended:  # an app that crashed reads no more: fail, not wait forever
            assert time.monotonic() < deadline, f"the app read only part of its source: {app.return_code=}"
            await pilot.pause(0.02)
        await pilot.pause()
        await pilot_fn(app, pilot)


def test_replay_fills_every_panel(run_events):
    last = [e for e in run_events if e.HasField("epoch")][-1]

    async def check(app, pilot):
        table = app.query_one(SlotTable)
        assert table.row_count == 3
        for slot in last.epoch.slots:
            row = table.get_row(f"tiny/{slot.slot}")
            assert str(row[1]) == slot.slot
            assert str(row[2]) == short_name(SeedStage, slot.stage)
            assert row[3] == f"{slot.alpha:.2f}"
            assert row[4] == short_name(Blueprint, slot.blueprint)
        assert str(table.get_row("tiny/early")[2]) == "FOSSILIZED"
        spark = app.query_one("#val_accuracy", Sparkline)
        assert list(spark.data) == pytest.approx([e.epoch.signals.val_accuracy for e in run_events
                                                  if e.HasField("epoch")])
        log = "\n".join(line.text for line in app.query_one(EventLog).lines)
        assert [e.decision for e in run_events if e.HasField("decision")][-1].reason in log
        assert "GERMINATED -> TRAINING" in log and "G_fossilize" in log
        assert not app.query_one(PolicyHealth).display  # no PPO in a heuristic run
        text = screen_text(app)
        assert "tiny" in text and f"epoch {last.epoch.signals.epoch}/14" in text and "source ended" in text

    asyncio.run(replay(run_events, check))


def test_snapshot_duplicates_are_dropped_and_gaps_counted(run_events):
    """A late joiner gets the snapshot, then some of the same events live: each is shown once; a hole
    in the sequence numbers is reported."""
    events = run_events[:30] + run_events[20:40] + run_events[45:]

    async def check(app, pilot):
        assert app.store.duplicates == 10
        assert app.store.runs["tiny"].lost == 5
        assert "5 events missed" in screen_text(app)

    asyncio.run(replay(events, check))


def ppo(update: int, entropy: float, approx_kl: float, clipfrac: float, ev: float,
        nonfinite_skipped: int = 0) -> TelemetryEvent:
    return TelemetryEvent(run_id="ppo", sequence=update, ppo_update=PPOUpdate(
        update=update, episodes=4 * update, global_step=80 * update, entropy=entropy, approx_kl=approx_kl,
        clipfrac=clipfrac, explained_variance=ev, action_counts={"WAIT": 70, "GERMINATE": 10},
        reward_components={"terminal": 0.4}, rollout_steps=80, nonfinite_skipped=nonfinite_skipped))


def test_policy_health_appears_with_ppo_and_is_coloured_by_thresholds():
    events = [ppo(1, 2.0, 0.01, 0.1, 0.6), ppo(2, 0.3, 0.08, 0.25, -0.2, nonfinite_skipped=3)]

    async def check(app, pilot):
        panel = app.query_one(PolicyHealth)
        assert panel.display
        assert panel.colours == {"entropy": "red", "approx_kl": "red", "clipfrac": "yellow",
                                 "explained_variance": "red"}
        text = screen_text(app)
        assert "update 2" in text and "approx_kl 0.0800" in text and "WAIT 70 (88%)" in text
        assert "3 minibatches not stepped on" in text

    asyncio.run(replay(events, check))


def test_the_dashboard_alerts_an_update_whose_minibatches_were_skipped():
    """The dashboard's state (karn.dashboard) says what the TUI's panel says in red: an alert, kept for a late
    joiner's snapshot, and the count in the update's message."""
    state = DashboardState()
    assert [m["type"] for m in state.apply(ppo(1, 2.0, 0.01, 0.1, 0.6))] == ["ppo"]
    messages = state.apply(ppo(2, 2.0, 0.01, 0.1, 0.6, nonfinite_skipped=3))
    assert [(m["type"], m.get("nonfinite_skipped"), m.get("kind")) for m in messages] == [
        ("ppo", 3, None), ("alert", None, "nonfinite")]
    assert messages[1]["text"] == "update 2: 3 minibatches not stepped on: gradient not finite"
    assert messages[1] in state.snapshot()["messages"]


def test_gradient_health_panel_shows_debug_epochs_with_their_flags():
    """Hidden while epochs carry no gradients (NORMAL telemetry); a DEBUG epoch shows every layer's
    norms with its flag."""
    plain = TelemetryEvent(run_id="dbg", sequence=1, epoch=EpochReport(signals=TrainingSignals(epoch=1, max_epochs=5)))
    debug = TelemetryEvent(run_id="dbg", sequence=2, epoch=EpochReport(
        signals=TrainingSignals(epoch=2, max_epochs=5),
        gradients=[LayerGradient(layer="block0", mean_norm=0.31, max_norm=0.42),
                   LayerGradient(layer="head", mean_norm=250.0, max_norm=900.0, exploding=True),
                   LayerGradient(layer="seed:mid", mean_norm=0.0, max_norm=0.0, vanishing=True)]))

    async def check(app, pilot):
        panel = app.query_one(GradientHealth)
        assert panel.display
        assert panel.flags == {"block0": "ok", "head": "exploding", "seed:mid": "vanishing"}
        text = screen_text(app)
        assert "dbg epoch 2" in text and "seed:mid" in text and "exploding" in text and "vanishing" in text

    async def hidden(app, pilot):
        assert not app.query_one(GradientHealth).display

    asyncio.run(replay([plain], hidden))
    asyncio.run(replay([plain, debug], check))


@pytest.mark.parametrize("name, value, colour", [
    ("approx_kl", 0.01, "green"), ("approx_kl", 0.03, "yellow"), ("approx_kl", 0.06, "red"),
    ("clipfrac", 0.1, "green"), ("clipfrac", 0.31, "red"),
    ("explained_variance", 0.9, "green"), ("explained_variance", 0.1, "yellow"), ("explained_variance", -1, "red"),
    ("entropy", 0.8, "green"), ("entropy", 0.3, "yellow"), ("entropy", 0.1, "red"),
])
def test_health_thresholds(name, value, colour):
    assert health_colour(name, value) == colour


def test_keys_help_and_quit(run_events):
    async def check(app, pilot):
        await pilot.press("question_mark")
        assert app.screen.query(HelpPanel)
        await pilot.press("question_mark")
        assert not app.screen.query(HelpPanel)
        await pilot.press("c")
        assert not app.query_one(EventLog).lines
        await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(replay(run_events[:10], check))


def test_small_terminal_still_renders(run_events):
    """Resize-safe: a cramped terminal shows the header line and does not raise."""
    async def check(app, pilot):
        await pilot.resize_terminal(60, 16)
        await pilot.pause()
        assert "tiny" in screen_text(app)

    asyncio.run(replay(run_events, check, size=(100, 30)))


def test_queue_source_from_another_thread_and_clean_exit(run_events):
    """An in-process run emits from a training thread; quitting stops the source even while it waits."""
    source = QueueSource(poll_s=0.01)

    def produce():
        for event in run_events[:12]:
            source.emit(event)

    async def main():
        app = make_app(source)
        async with app.run_test(size=SIZE) as pilot:
            threading.Thread(target=produce).start()
            for _ in range(200):
                if app.store.received["epoch"]:
                    break
                await pilot.pause(0.02)
            assert app.query_one(SlotTable).row_count == 3
            await pilot.press("q")  # the source never finished: stop() must end the worker's loop

    asyncio.run(main())
    assert source._stopped.is_set()


def test_curves_restart_for_another_run(run_events):
    epochs = [e for e in run_events if e.HasField("epoch")][:3]
    other = TelemetryEvent(run_id="other", sequence=1)
    other.epoch.CopyFrom(epochs[0].epoch)

    async def check(app, pilot):
        curves = app.query_one(Curves)
        assert curves.run_id == "other" and len(curves.query_one("#val_accuracy", Sparkline).data) == 1
        assert "other" in str(app.query_one(RunHeader).content)
        assert app.query_one(SlotTable).row_count == 6

    asyncio.run(replay(epochs + [other], check))


def train_headless(monkeypatch, argv: list[str], look) -> dict:
    """`esper <argv>` (with --tui) with the app driven headless in place of a terminal: once the run's
    events have all arrived, `look(app)` says what the screen showed."""
    from esper.cli import main
    from esper.karn.tui import TelemetryApp

    seen = {}

    def headless(app):
        async def drive():
            async with app.run_test(size=SIZE) as pilot:
                while not app.source_ended:
                    await pilot.pause(0.05)
                await pilot.pause()
                seen.update(look(app))
                await pilot.press("q")

        asyncio.run(drive())

    monkeypatch.setattr(TelemetryApp, "run", headless)
    assert main(argv) == 0
    return seen


def test_train_tui_shows_the_in_process_run(monkeypatch, tmp_path):
    """`esper train heuristic --tui`: the run trains in a thread and the app sees every epoch; the run
    directory is complete."""
    argv = ["train", "heuristic", "--task", "synthetic", "--max-epochs", "4", "--max-batches", "3",
            "--slots", "early", "mid", "--runs-dir", str(tmp_path), "--tui"]
    seen = train_headless(monkeypatch, argv, lambda app: {"epochs": app.store.received["epoch"],
                                                          "rows": app.query_one(SlotTable).row_count})
    assert seen == {"epochs": 4, "rows": 2}
    assert len(list(tmp_path.glob("*/summary.json"))) == 1


def test_train_ppo_tui_shows_envs_rewards_and_policy_health(monkeypatch, tmp_path):
    """`esper train ppo --tui`: every environment's episode gets its slot rows, and each PPO update its
    policy health, action distribution and rewards, as the run's own telemetry file records them."""
    from esper.nissa import read_jsonl

    argv = ["train", "ppo", "--task", "synthetic", "--max-epochs", "3", "--max-batches", "1", "--slots", "early",
            "mid", "--n-envs", "2", "--episodes", "4", "--update-every", "1", "--num-workers", "1",
            "--runs-dir", str(tmp_path), "--tui"]
    seen = train_headless(monkeypatch, argv, lambda app: {
        "rows": sorted(k.value for k in app.query_one(SlotTable).rows), "colours": app.query_one(PolicyHealth).colours,
        "text": screen_text(app), "per_step": list(app.query_one(Rewards).per_step)})
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]  # beside karn.db, the run store
    events = list(read_jsonl(run_dir / "telemetry.jsonl"))
    updates = [e.ppo_update for e in events if e.HasField("ppo_update")]
    print("rows", seen["rows"], "colours", seen["colours"], "reward per step", seen["per_step"])
    assert seen["rows"] == sorted(f"{run_dir.name}_ep{i:04d}/{slot}" for i in range(4) for slot in ("early", "mid"))
    assert set(seen["colours"]) == {"entropy", "approx_kl", "clipfrac", "explained_variance"}
    assert seen["per_step"] == pytest.approx([sum(u.reward_components.values()) / u.rollout_steps for u in updates])
    last = updates[-1]
    assert f"update {last.update}" in seen["text"]
    for op, n in last.action_counts.items():
        assert f"{op} {n} ({n / last.rollout_steps:.0%})" in seen["text"]
    for name, total in last.reward_components.items():
        assert f"{name} {total / last.rollout_steps:+.4f}" in seen["text"]


def test_a_diverged_epoch_is_shown_not_drawn():
    """A NaN or inf loss (a diverged epoch, as a file or an older build reports it) is left out of the
    curve and shown as the latest value: the sparkline had crashed the app on it."""
    def epoch(sequence: int, n: int, loss: float) -> TelemetryEvent:
        return TelemetryEvent(run_id="r", sequence=sequence, epoch=EpochReport(
            signals=TrainingSignals(epoch=n, max_epochs=5, val_accuracy=40.0 + n, train_loss=loss, val_loss=loss)))

    async def check(app, pilot):
        assert app.query_one("#train_loss", Sparkline).data == [2.0]
        assert "train loss inf  (best 2.0000)" in screen_text(app)

    asyncio.run(replay([epoch(1, 1, 2.0), epoch(2, 2, float("nan")), epoch(3, 3, float("inf"))], check))


def test_rewards_too_far_apart_for_one_scale_are_shown_not_drawn():
    """Two finite per-step rewards whose spread is past a float's range (1.7e308 and -1.7e308) had ended the
    app in the sparkline's int(NaN)."""
    def update(sequence: int, reward: float) -> TelemetryEvent:
        return TelemetryEvent(run_id="ppo", sequence=sequence, ppo_update=PPOUpdate(
            update=sequence, rollout_steps=1, reward_components={"a": reward}))

    async def check(app, pilot):
        assert app.query_one("#reward-curve", Sparkline).data == [0.5]
        assert str(app.query_one("#reward-label", Label).render()).endswith("(best +0.5000)")

    asyncio.run(replay([update(1, 0.5), update(2, 1.7e308), update(3, -1.7e308)], check))


def test_each_ppo_run_is_judged_against_its_own_first_update():
    """A second PPO run's entropy is a fraction of its own first, not the first run's, and its rewards
    are drawn on their own, as the dashboard keeps them."""
    def update(run_id: str, entropy: float, reward: float) -> TelemetryEvent:
        return TelemetryEvent(run_id=run_id, sequence=1, ppo_update=PPOUpdate(
            update=1, entropy=entropy, rollout_steps=10, reward_components={"terminal": 10 * reward}))

    async def check(app, pilot):
        assert app.query_one(PolicyHealth).colours["entropy"] == "green" and "(100% of first)" in screen_text(app)
        assert app.query_one(Rewards).per_step == [-0.25]

    asyncio.run(replay([update("ppo_a", 2.0, 0.5), update("ppo_b", 0.5, -0.25)], check))


def test_a_closed_app_keeps_none_of_the_events_it_will_not_read():
    """`esper train --tui`: the run goes on after the app closes; what it emits then is not queued up."""
    source = QueueSource()
    source.stop()
    for sequence in range(1, 101):
        source.emit(TelemetryEvent(run_id="r", sequence=sequence))
    assert source._queue.qsize() == 0


def test_tui_file_must_exist(tmp_path, capsys):
    from esper.cli import main

    assert main(["tui", "--file", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    # A file that is not telemetry had been shown as an empty run, by the TUI and the dashboard alike.
    (tmp_path / "notes.txt").write_text("not json\n")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "binary").write_bytes(b"\x00\xd0\xff\n")
    for command in ("tui", "dashboard"):
        assert main([command, "--file", str(tmp_path / "notes.txt")]) == 2
        assert capsys.readouterr().err.startswith(f"esper: error: --file {tmp_path / 'notes.txt'}:1: not a telemetry "
                                                  "event")
        assert main([command, "--file", str(tmp_path / "empty.jsonl")]) == 2
        assert capsys.readouterr().err == f"esper: error: --file {tmp_path / 'empty.jsonl'}: no telemetry event in it\n"
        assert main([command, "--file", str(tmp_path / "binary")]) == 2
        assert capsys.readouterr().err == f"esper: error: --file {tmp_path / 'binary'}: not a telemetry JSONL file " \
                                          "(not UTF-8 text)\n"


def test_a_replayed_file_shows_the_run_asked_for_only(tmp_path, capsys):
    """`--run-id` with `--file` had been ignored (every run of the file shown): it shows the run and, for a PPO
    run, its episodes; the bus's flags with it are refused rather than ignored."""
    from esper.cli import build_parser
    from esper.karn_cli import watched_source
    from esper.nissa import JsonlSink

    sink = JsonlSink(tmp_path / "runs.jsonl")
    for run_id in ("a", "b", "a", "b_ep0000", "bb"):
        sink.emit(TelemetryEvent(run_id=run_id, sequence=1, run_started=RunStarted(task="synthetic")))
    sink.close()
    for command in ("tui", "dashboard"):
        events, title = watched_source(build_parser().parse_args([command, "--file", str(tmp_path / "runs.jsonl"),
                                                                  "--run-id", "b"]))
        assert [e.run_id for e in events] == ["b", "b_ep0000"] and title == f"{tmp_path / 'runs.jsonl'} (run b)"
        assert watched_source(build_parser().parse_args([command, "--file", str(tmp_path / "runs.jsonl"),
                                                         "--run-id", "c"])) is None
        assert capsys.readouterr().err == f"esper: error: --file {tmp_path / 'runs.jsonl'}: no event of run c in it\n"
        assert watched_source(build_parser().parse_args([command, "--file", str(tmp_path / "runs.jsonl"),
                                                         "--hub-sub", "tcp://127.0.0.1:5555"])) is None
        assert capsys.readouterr().err == "esper: error: --hub-sub: for the bus; --file replays a file\n"


SNAPSHOT = Path(__file__).parent / "snapshots" / "tui_canned.txt"


def canned_events() -> list[TelemetryEvent]:
    """A fixed story (not a training run, whose numbers vary by CPU build): three epochs, a germination
    with its decision, gate and transition, a governor rollback and a PPO update."""
    def event(seq: int, run_id: str = "canned", **payload) -> TelemetryEvent:
        return TelemetryEvent(run_id=run_id, sequence=seq, **payload)

    def report(epoch: int, acc: float, mid: SlotState) -> EpochReport:
        return EpochReport(signals=TrainingSignals(epoch=epoch, max_epochs=10, val_accuracy=acc, best_val_accuracy=acc,
                                                   train_loss=2.0 - acc / 100, val_loss=2.1 - acc / 100,
                                                   train_accuracy=acc - 1, host_params=1000, total_params=1200),
                           slots=[SlotState(slot="early", stage=SeedStage.SEED_STAGE_DORMANT), mid])

    blending = SlotState(slot="mid", stage=SeedStage.SEED_STAGE_BLENDING, blueprint=Blueprint.BLUEPRINT_CONV_LIGHT,
                         seed_id=1, alpha=0.4, epochs_in_stage=2, has_contribution=True, contribution=1.25,
                         contribution_se=0.5)
    return [
        event(1, run_started=RunStarted(mode="heuristic", task="synthetic", seed=7, device="cpu")),
        event(2, epoch=report(1, 30.0, SlotState(slot="mid", stage=SeedStage.SEED_STAGE_DORMANT))),
        event(3, decision=Decision(action=Action(operation=Operation.OPERATION_GERMINATE, slot="mid",
                                                 blueprint=Blueprint.BLUEPRINT_CONV_LIGHT), reason="plateau of 3 epochs")),
        event(4, gate=GateCheck(gate="G_germinate", slot="mid", seed_id=1, passed=True, reason="budget left")),
        event(5, transition=LifecycleTransition(slot="mid", seed_id=1, blueprint=Blueprint.BLUEPRINT_CONV_LIGHT,
                                                from_stage=SeedStage.SEED_STAGE_DORMANT,
                                                to_stage=SeedStage.SEED_STAGE_GERMINATED, epoch=1, reason="germinate")),
        event(6, epoch=report(2, 35.5, blending)),
        event(7, governor=GovernorEvent(epoch=3, cause="divergence", train_loss=12.0, restored_epoch=2)),
        event(8, epoch=report(3, 41.0, blending)),
        event(1, run_id="ppo", ppo_update=PPOUpdate(update=1, episodes=4, global_step=40, entropy=1.5, approx_kl=0.01,
                                                    clipfrac=0.05, explained_variance=0.7, rollout_steps=40,
                                                    action_counts={"WAIT": 30, "GERMINATE": 10},
                                                    reward_components={"terminal": 0.35})),
    ]


def test_snapshot_at_fixed_size():
    """The screen at 100x32 as text, against tests/unit/snapshots/tui_canned.txt. After an intended
    change of the layout, rewrite it with ESPER_UPDATE_SNAPSHOTS=1 and read the diff."""
    async def check(app, pilot):
        text = screen_text(app)
        if os.environ.get("ESPER_UPDATE_SNAPSHOTS"):
            SNAPSHOT.parent.mkdir(exist_ok=True)
            SNAPSHOT.write_text(text)
        assert text == SNAPSHOT.read_text()

    asyncio.run(replay(canned_events(), check, size=(100, 32)))


def test_async_source_and_a_failing_source():
    """An async iterable is read by an async worker; a source that raises ends with the error on
    screen and what it had delivered still shown."""
    events = canned_events()

    async def stream():
        for event in events[:4]:
            yield event
        raise OSError("socket closed")

    async def check(app, pilot):
        assert app.store.received["decision"] == 1
        assert "source failed:" in screen_text(app) and "OSError: socket closed" in screen_text(app)

    async def main():
        app = make_app(stream())
        async with app.run_test(size=SIZE) as pilot:
            while not app.source_ended:
                await pilot.pause(0.02)
            await pilot.pause()
            await check(app, pilot)

    asyncio.run(main())


def test_a_training_episode_is_shown_as_not_tested_not_as_0_percent():
    """A PPO training episode's RunFinished has no test accuracy: the log and the header had said 0.00%."""
    from esper.karn.tui.widgets.event_log import describe
    from esper.leyline import RunFinished

    tested = TelemetryEvent(run_id="r", run_finished=RunFinished(val_accuracy=50, test_accuracy=48.5, epochs=3))
    untested = TelemetryEvent(run_id="r", run_finished=RunFinished(val_accuracy=50, epochs=3))
    assert "test 48.50%" in describe(tested) and "not tested" in describe(untested)
    assert "test 0.00%" in describe(TelemetryEvent(run_id="r", run_finished=RunFinished(test_accuracy=0.0)))


def test_names_from_the_wire_are_shown_as_sent_and_values_of_a_newer_build_as_unknown():
    """A run id is free text (a worker's --worker-id), and proto3 enums are open (a worker of a newer build):
    brackets in a run id or gate had been read as Rich markup ("node[a]" shown as "node", "w[/]" a
    MarkupError that ended the app), and a stage number this build lacks a ValueError that ended it."""
    runs = ("node[a]_ep0000", "w[/]")
    events = []
    for run_id in runs:
        events += [
            TelemetryEvent(run_id=run_id, sequence=1, run_started=RunStarted(mode="heuristic", task="[/b]synthetic")),
            TelemetryEvent(run_id=run_id, sequence=2, epoch=EpochReport(
                signals=TrainingSignals(epoch=1, max_epochs=5, val_accuracy=40.0),
                slots=[SlotState(slot="mid[/]", stage=99, blueprint=77)], gradients=[LayerGradient(layer="[/]")])),
            TelemetryEvent(run_id=run_id, sequence=3, gate=GateCheck(gate="[/b]", slot="[/]", passed=True)),
            TelemetryEvent(run_id=run_id, sequence=4, decision=Decision(action=Action(operation=42, slot="[/]"))),
            TelemetryEvent(run_id=run_id, sequence=5, governor=GovernorEvent(epoch=1, cause="x", culled_slots=["[/]"])),
        ]

    async def check(app, pilot):
        text = screen_text(app)
        assert "w[/]" in text and "[/b]synthetic" in text, text  # the header: the run shown last
        table = app.query_one(SlotTable)
        for run_id in runs:
            row = table.get_row(f"{run_id}/mid[/]")
            assert [str(cell) for cell in row[:3]] == [run_id, "mid[/]", "unknown"]
        log = "\n".join(str(line.text) for line in app.query_one(EventLog).lines)
        assert "[/b] [/] #0 pass" in log and "culled [/]" in log, log
        assert app.query_one(GradientHealth).flags == {"[/]": "ok"} and "w[/] epoch 1" in text, text

    asyncio.run(replay(events, check))
