"""Run growth experiments in one process: build the objects, drive episodes, write the run directory.

A run directory `runs/<time>_<mode>_<task>_s<seed>/` holds `config.json` (the resolved config),
`telemetry.jsonl` (one leyline TelemetryEvent per line), `summary.json` and `model/` (the grown
network exported as plain layers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from esper.kasmina import save_exported
from esper.leyline import Observation, RunFinished, RunStarted, SeedStage, TelemetryLevel, from_short_name, short_name
from esper.nissa import JsonlSink, Sink, Telemetry
from esper.simic import EnvConfig, GrowthEnv, run_episode
from esper.tamiyo import HeuristicConfig, HeuristicPolicy, Policy, WaitPolicy
from esper.tolaria.data import load_task_data

MODES = ("heuristic", "static")


@dataclass(frozen=True)
class RunConfig:
    mode: str = "heuristic"
    """heuristic (grow under the rule-based controller) | static (the host alone, same budget)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    heuristic: HeuristicConfig = field(default_factory=HeuristicConfig)
    episodes: int = 1
    """Independent runs; episode i uses seed + i."""
    seed: int = 42
    device: str = "cpu"
    data_dir: str | None = None
    gpu_preload: bool = False
    """Keep the whole dataset on the device (no host->device copy per batch)."""
    telemetry_level: str = "normal"
    telemetry_file: str | None = None
    """Append every episode's events to this JSONL file (besides the run directory's own)."""
    telemetry_dir: str | None = None
    """Write each episode's events to <dir>/<run_id>.jsonl."""
    runs_dir: str = "runs"


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def make_policy(cfg: RunConfig) -> Policy:
    return HeuristicPolicy(cfg.heuristic) if cfg.mode == "heuristic" else WaitPolicy()


def stage_line(obs: Observation) -> str:
    return " ".join(f"{s.slot}:{short_name(SeedStage, s.stage)}" for s in obs.slots)


def run(cfg: RunConfig, console: Console | None = None, policy: Policy | None = None,
        sinks: tuple[Sink, ...] = ()) -> list[dict]:
    """Run `cfg.episodes` episodes; returns their summaries (also written to each run directory).
    `policy` replaces the one `cfg.mode` names and `sinks` get every event too: the tolaria worker
    service passes a remote policy and the bus publisher here."""
    console = console or Console(stderr=True)
    device = torch.device(cfg.device)
    data = load_task_data(cfg.env.task, cfg.data_dir)
    if cfg.gpu_preload:
        data = data.to(device)
    summaries = []
    for episode in range(cfg.episodes):
        summaries.append(run_one(cfg, data, device, cfg.seed + episode, console, policy, sinks))
    return summaries


def run_one(cfg: RunConfig, data, device: torch.device, seed: int, console: Console,
            policy: Policy | None = None, extra_sinks: tuple[Sink, ...] = ()) -> dict:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_id = f"{stamp}_{cfg.mode}_{cfg.env.task}_s{seed}"
    run_dir = Path(cfg.runs_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    config_json = json.dumps(dataclasses.asdict(cfg) | {"episode_seed": seed}, indent=2)
    (run_dir / "config.json").write_text(config_json)

    level = from_short_name(TelemetryLevel, cfg.telemetry_level)
    sinks = list(extra_sinks)
    if level != TelemetryLevel.TELEMETRY_LEVEL_OFF:
        sinks.append(JsonlSink(run_dir / "telemetry.jsonl"))
        if cfg.telemetry_file:
            sinks.append(JsonlSink(Path(cfg.telemetry_file)))
        if cfg.telemetry_dir:
            sinks.append(JsonlSink(Path(cfg.telemetry_dir) / f"{run_id}.jsonl"))
    telemetry = Telemetry(run_id, level, sinks)
    telemetry.emit(run_started=RunStarted(mode=cfg.mode, task=cfg.env.task, seed=seed,
                                          device=str(device), config_json=config_json))
    env = GrowthEnv(cfg.env, data, device, telemetry)
    start = time.perf_counter()
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("val {task.fields[acc]}  loss {task.fields[loss]}  {task.fields[slots]}"),
        TimeElapsedColumn(), console=console, transient=False,
    ) as progress:
        bar = progress.add_task(run_id, total=cfg.env.max_epochs, acc="-", loss="-", slots="")
        curve: list[dict] = []

        def on_epoch(obs: Observation) -> None:
            progress.update(bar, completed=obs.signals.epoch, acc=f"{obs.signals.val_accuracy:.2f}%",
                            loss=f"{obs.signals.train_loss:.3f}", slots=stage_line(obs))
            curve.append({
                "epoch": obs.signals.epoch, "val_accuracy": obs.signals.val_accuracy,
                "val_loss": obs.signals.val_loss,
                "train_loss": obs.signals.train_loss, "total_params": obs.signals.total_params,
                "train_flops": env.trainer.train_flops,
                "stages": {s.slot: short_name(SeedStage, s.stage) for s in obs.slots},
            })

        obs = run_episode(env, policy or make_policy(cfg), seed, on_epoch)
    test_accuracy = env.test_accuracy()
    wall = time.perf_counter() - start
    telemetry.emit(run_finished=RunFinished(val_accuracy=obs.signals.val_accuracy, test_accuracy=test_accuracy,
                                            total_params=obs.signals.total_params, wall_seconds=wall,
                                            epochs=obs.signals.epoch))
    telemetry.close()
    save_exported(env.model, run_dir / "model")
    if data.tokenizer is not None:  # a language model: `esper sample` needs ids -> text
        data.tokenizer.save(run_dir / "model" / "tokenizer.json")
    summary = summarize(env, obs, run_id, cfg, seed, str(device), test_accuracy, wall) | {"curve": curve}
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, run_dir / "summary.json")
    console.print(
        f"{run_id}: val {summary['val_accuracy']:.2f}% (loss {summary['val_loss']:.3f})  test {test_accuracy:.2f}%  "
        f"params {summary['total_params']:,}  seeds {summary['seed_counts']}  {wall:.1f}s  -> {run_dir}"
    )
    return summary


def summarize(env: GrowthEnv, obs: Observation, run_id: str, cfg: RunConfig, seed: int, device: str,
              test_accuracy: float, wall: float) -> dict:
    seeds = [dataclasses.asdict(r) | {"fate": r.fate} for r in env.model.records]
    counts: dict[str, int] = {}
    for s in seeds:
        counts[s["fate"]] = counts.get(s["fate"], 0) + 1
    return {
        "run_id": run_id,
        "mode": cfg.mode,
        "task": cfg.env.task,
        "seed": seed,
        "device": device,
        "epochs": obs.signals.epoch,
        "wall_seconds": wall,
        "val_accuracy": obs.signals.val_accuracy,
        "val_loss": obs.signals.val_loss,
        "best_val_accuracy": obs.signals.best_val_accuracy,
        "test_accuracy": test_accuracy,
        "host_params": obs.signals.host_params,
        "total_params": obs.signals.total_params,
        "train_flops": env.trainer.train_flops,
        "seed_counts": counts,
        "seeds": seeds,
    }
