"""`esper compare`: arms trained at the same budget over N seeds, with paired statistics and plots.

Arms (all with the same epochs x batches, data, optimizer settings and seeds):
- static: the host alone;
- heuristic: growth under the rule-based controller;
- from-scratch: each heuristic run's final architecture (same seed; a seed still blending at the end is
  built in whole, at alpha 1), built in before epoch 1 and trained for the whole budget: what growth must
  match to be worth anything;
- ppo (with --policy): growth under a saved PPO policy (`esper train learned`), on held-out seeds only:
  `esper train ppo` trains episode i on seed + i, and compare refuses a --seed range that meets those.
`--budget original` adds the original project's unmatched baseline (the static host at 10 epochs
against 40 epochs of growth) beside the arms at the same budget, 40 epochs.

Every run is a child `esper train` process writing its own run directory; up to `--workers` run at
once on the device (one process per run: see bench/concurrency.py for the measurement behind it). With
`grouped` each GROUP_EPISODES (8) of an arm's seeds are one child instead, `esper train MODE --grouped`:
the hosts as the groups of one network and each run's seeds on its group (esper.tolaria.grouped), each
seed still its own run directory (from-scratch's child builds in each seed's grown architecture: `--graft
SEED=SLOT:BLUEPRINT`).
Results come back as the children's summary.json files: no objects cross a process boundary. So an
interrupted comparison resumes from its folder (`--resume`): a run with a summary is done, any other
run starts again from its first epoch, and every run's result is the one an uninterrupted comparison
gets, on the same machine with the same `--workers` (each run depends only on its arm, its seed, the grown
run it grafts from and its CPU threads; a grouped run also on the runs in its group, so a group with a run
not done trains all its seeds again).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from esper.durable import lock_exclusively, write_atomic
from esper.experiment import GROUP_EPISODES, read_summary
from esper.kasmina import HOSTS
from esper.simic.checkpoint import ResumeError, changed_settings, file_sha256
from esper.simic.env import fates_in_words
from esper.tolaria.trainer import TrainConfig


@dataclass(frozen=True)
class Arm:
    name: str
    mode: str  # the `esper train` mode: static | heuristic | learned
    max_epochs: int
    graft_from: str | None = None  # take the final architecture of this arm's run with the same seed
    same_steps: bool = True  # the same epochs of the same batches as the other arms (static@10: fewer)


ORIGINAL_STATIC = Arm("static@10", "static", 10, same_steps=False)
"""The original table's static baseline: 10 epochs against its growth's 40, unmatched."""


def arms_for(budget: str, max_epochs: int, names: list[str]) -> list[Arm]:
    arms = {
        "static": Arm("static", "static", max_epochs),
        "heuristic": Arm("heuristic", "heuristic", max_epochs),
        "from-scratch": Arm("from-scratch", "static", max_epochs, graft_from="heuristic"),
        "ppo": Arm("ppo", "learned", max_epochs),
    }
    chosen = [arms[n] for n in names]
    if budget == "original":
        chosen.insert(0, ORIGINAL_STATIC)
    return chosen


def phases(arms: list[Arm]) -> tuple[list[Arm], list[Arm]]:
    """The arms in the order they can run: an arm that grafts another's architecture waits for that arm."""
    return [a for a in arms if not a.graft_from], [a for a in arms if a.graft_from]


def seed_blocks(cfg: CompareConfig, seeds: list[int]) -> list[list[int]]:
    """An arm's seeds as its children train them: one each, or under `cfg.grouped` up to GROUP_EPISODES
    consecutive ones (the group `esper train --grouped` trains at once: a child is one group)."""
    size = GROUP_EPISODES if cfg.grouped else 1
    return [seeds[i:i + size] for i in range(0, len(seeds), size)]


def sharing(cfg: CompareConfig, phase: list[Arm]) -> tuple[int, int]:
    """(runs at once, CPU threads each) in a phase: all workers, or fewer when the phase has fewer runs (a
    grouped run is one of seed_blocks), the cores shared out among them. Counted from the phase's runs, not
    those a resume has left: a CPU run's numbers depend on its threads."""
    at_once = max(1, min(cfg.workers, len(phase) * len(seed_blocks(cfg, list(range(cfg.seeds))))))
    return at_once, max(1, (os.cpu_count() or 1) // at_once)


@dataclass(frozen=True)
class CompareConfig:
    task: str = "cifar10"
    max_epochs: int = 40
    max_batches: int = 0
    seeds: int = 5
    seed: int = 42
    slots: tuple[str, ...] = ("mid",)
    device: str = "cpu"
    data_dir: str | None = None
    gpu_preload: bool = False
    precision: str = "fp32"
    compile: bool = False
    memory_format: str = "auto"
    cudnn_benchmark: bool = False
    cuda_graph: bool = True
    """Every arm's runs train with the same precision, compilation, memory format, cuDNN mode and (grouped,
    on CUDA) CUDA graphs (TrainConfig)."""
    workers: int = 1
    grouped: bool = False
    """Train each GROUP_EPISODES of an arm's seeds as one grouped run (`esper train MODE --grouped`: the
    hosts as the groups of one network, each run's seeds on its group), which takes one of the `workers`;
    otherwise one process per seed."""
    out_dir: str = "compare"
    budget: str = "matched"
    arms: tuple[str, ...] = ("static", "heuristic", "from-scratch")
    policy: str | None = None
    """The checkpoint the `ppo` arm's runs are driven by."""
    policy_sha256: str = ""
    """Its digest: `--resume` refuses the file rewritten since, as `esper train --resume` does."""
    db: str = "runs/karn.db"
    """The run store (SQLite) every run records itself in as it ends: `esper runs list` shows them (not at
    telemetry level off: a run is recorded from its telemetry)."""
    telemetry_level: str = "normal"
    """Every run's telemetry.jsonl: `normal` keeps the decisions and gate values, which say why a grown
    arm won or lost (each run's cost: bench/telemetry_overhead.py); `minimal` keeps only transitions."""
    progress_every: float = 60.0
    """Seconds between the lines that say how far each running run is (0: none); read from the runs'
    telemetry files, so the runs themselves never wait for it."""


RESUMABLE = ("device", "data_dir", "gpu_preload", "workers", "out_dir", "db", "progress_every", "cudnn_benchmark",
             "cuda_graph")
"""CompareConfig fields a resumed comparison may change: where and how fast it runs, not what it compares."""


def saved_settings(out: Path) -> dict:
    """The settings the comparison in `out` was started with (its compare.json); ResumeError when that file
    is not a comparison's settings."""
    try:
        saved = json.loads((out / "compare.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{out}: its compare.json cannot be read ({exc})") from None
    if not isinstance(saved, dict):
        raise ResumeError(f"{out}: its compare.json is not a comparison's settings")
    return saved


def differences(cfg: CompareConfig, out: Path) -> list[str]:
    """The fields (but RESUMABLE) in which `cfg` differs from the comparison saved in `out`."""
    return changed_settings(cfg, saved_settings(out), RESUMABLE)


def runs_dir(cfg: CompareConfig, arm: Arm, seed: int | str) -> Path:
    return Path(cfg.out_dir) / "runs" / arm.name / f"seed{seed}"


class RunFailed(Exception):
    """A run's `esper train` exited non-zero; the message is the run and the last line it wrote."""


def train_command(cfg: CompareConfig, arm: Arm, seeds: list[int], grafts: dict[int, list[str]]) -> list[str]:
    """The `esper train` of `seeds` (consecutive) of the arm: one process each, or all of them under
    `cfg.grouped`. `grafts`: seed -> the SLOT:BLUEPRINT seeds its run builds in (from-scratch's)."""
    cmd = [sys.executable, "-m", "esper.cli", "train", arm.mode, "--task", cfg.task,
           "--max-epochs", str(arm.max_epochs), "--max-batches", str(cfg.max_batches),
           "--seed", str(seeds[0]), "--episodes", str(len(seeds)), "--slots", *cfg.slots, "--device", cfg.device,
           "--runs-dir", str(runs_dir(cfg, arm, "{seed}")), "--telemetry-level", cfg.telemetry_level]
    if cfg.telemetry_level != "off":  # a run is recorded in the store from its telemetry
        cmd += ["--db", cfg.db]
    if cfg.data_dir:
        cmd += ["--data-dir", cfg.data_dir]
    if cfg.gpu_preload:
        cmd.append("--gpu-preload")
    cmd += ["--precision", cfg.precision, "--memory-format", cfg.memory_format]
    cmd += (["--compile"] if cfg.compile else []) + (["--cudnn-benchmark"] if cfg.cudnn_benchmark else [])
    cmd += [] if cfg.cuda_graph else ["--no-cuda-graph"]
    for seed, seed_grafts in grafts.items():
        for graft in seed_grafts:
            cmd.append(f"--graft={seed}={graft}")  # one item: argparse takes a separate "-1=..." for a flag
    if arm.mode == "learned":
        cmd += ["--policy", str(Path(cfg.out_dir) / POLICY_COPY)]
    cmd.append("--grouped" if cfg.grouped else "--no-grouped")  # `esper train`'s default depends on the device
    # A comparison's runs are never resumed (a cut-off run starts again): spare each epoch its checkpoint
    # (a copy off the device, an fsync).
    return cmd + ["--checkpoint-every", "0"]


def final_seeds(summary: dict) -> list[dict]:
    """The seeds that shape the final network (fossilized, still blending, or grafted)."""
    return [s for s in summary["seeds"] if s["fate"] in ("fossilized", "blending", "grafted")]


def final_architecture(summary: dict) -> list[str]:
    """slot:blueprint of every seed of final_seeds."""
    return [f"{s['slot']}:{s['blueprint']}" for s in final_seeds(summary)]


def final_params(summary: dict) -> int:
    """The parameters of the final network: the host and final_seeds (total_params also counts the seeds
    still germinated or training, which a from-scratch run of the same architecture leaves out)."""
    return summary["host_params"] + sum(s["params"] for s in final_seeds(summary))


def progress_of(run_parent: Path, task: str) -> str | None:
    """'epoch 12/40, val accuracy 61.2' from the newest epoch event in the telemetry of the run under
    `run_parent`; None before its first epoch, or at a telemetry level that records no epochs."""
    for path in run_parent.glob("*/telemetry.jsonl"):
        for line in reversed(path.read_text(encoding="utf-8").splitlines()):
            try:
                report = json.loads(line).get("epoch")
            except json.JSONDecodeError:  # the line the run is writing now
                continue
            if isinstance(report, dict):  # an EpochReport (a transition's "epoch" is its number)
                s = report["signals"]
                shown = (f"val loss {s.get('valLoss', 0.0):.3f}" if headline(task)[0] == "test_loss"
                         else f"val accuracy {s.get('valAccuracy', 0.0):.1f}")
                return f"epoch {s.get('epoch', 0)}/{s.get('maxEpochs', 0)}, {shown}"
    return None


SUMMARY_KEYS = ("seed", "host_params", "seeds", "seed_counts", "train_flops", "wall_seconds", "curve")
"""What the report reads of each run's summary, besides its headline figure."""


def reportable(summary: dict, key: str, epochs: int) -> bool:
    """Whether the report can read `summary`, a run of `epochs` epochs: its headline figure `key` and
    SUMMARY_KEYS, each of the type the report reads it as, and a curve of every epoch. A summary damaged by
    hand ("test_accuracy": "high") had passed, to fail the report in a traceback after every other run trained."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def point(p) -> bool:  # an epoch of the curve, as the plots read it
        return (isinstance(p, dict) and all(number(p.get(k)) for k in ("epoch", "total_params", "val_accuracy",
                                                                          "val_loss"))
                and isinstance(p.get("stages"), dict) and all(s in STAGE_COLOURS for s in p["stages"].values()))

    def seed(s) -> bool:
        return isinstance(s, dict) and isinstance(s.get("fate"), str) and number(s.get("params"))

    return (all(k in summary for k in (key, *SUMMARY_KEYS))
            and all(number(summary[k]) for k in (key, "seed", "host_params", "train_flops", "wall_seconds"))
            and isinstance(summary["seeds"], list) and all(seed(s) for s in summary["seeds"])
            and isinstance(summary["seed_counts"], dict) and all(number(n) for n in summary["seed_counts"].values())
            and isinstance(summary["curve"], list) and len(summary["curve"]) == epochs
            and all(point(p) for p in summary["curve"]))


def blocks_to_train(cfg: CompareConfig, arm: Arm, seeds: list[int], results: dict[int, dict], log) -> list[list[int]]:
    """The arm's blocks of seeds (seed_blocks) still to train.
    The runs of the blocks that the comparison this one resumes finished go into `results` (seed -> summary).
    A block with a run cut off trains again whole: a grouped run's numbers depend, at float-summation level,
    on the runs in its group. A summary without the headline figure or any of SUMMARY_KEYS (written by an
    older version: a language model's run from before summaries held the test loss) trains again too, where
    the report would have failed on it after the training, and so does one of a value of another type
    (reportable). The folders of a block to train again are cleared, and
    their runs dropped from the store (--db), where a grouped run that had finished had recorded itself:
    the store holds the comparison's runs, not the ones it threw away."""
    todo, cleared = [], []
    key, _ = headline(cfg.task)
    for block in seed_blocks(cfg, seeds):
        found = [next(runs_dir(cfg, arm, seed).glob("*/summary.json"), None) for seed in block]
        done = [read_summary(path) if path else {} for path in found]
        if all(reportable(summary, key, arm.max_epochs) for summary in done):
            for seed, summary in zip(block, done):
                results[seed] = summary
                log(f"{arm.name:>13} seed {seed}: finished already")
        else:
            for seed in block:
                folder = runs_dir(cfg, arm, seed)
                cleared += [run.name for run in folder.glob("*") if run.is_dir()]  # a run's folder is its id
                shutil.rmtree(folder, ignore_errors=True)
            todo.append(block)
    if cleared and Path(cfg.db).is_file():
        forget_runs(Path(cfg.db), cleared, log)
    return todo


def forget_runs(db: Path, run_ids: list[str], log) -> None:
    """Drop runs from the store; a store that cannot be written is a warning (the comparison's results are its
    folders): `esper runs index` rebuilds a store from them."""
    import sqlite3

    from esper.karn.runs_db import RunsDB, StoreError

    try:
        store = RunsDB(db)
        try:
            store.forget(run_ids)
        finally:
            store.close()
    except (StoreError, sqlite3.Error) as exc:
        log(f"esper: warning: --db {db} still lists the runs {', '.join(run_ids)}, trained again now ({exc})")


def run_all(cfg: CompareConfig, log=print, on_phase=None, on_wake=None) -> dict[str, list[dict]]:
    """Run every (arm, seed); returns arm -> summaries in seed order. `on_phase(results so far)` after
    each phase, so an interrupted comparison still leaves a report of the arms it finished; `on_wake()`
    about once a second while runs train."""
    arms = arms_for(cfg.budget, cfg.max_epochs, list(cfg.arms))
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    results: dict[str, dict[int, dict]] = {arm.name: {} for arm in arms}

    running: dict[str, tuple[Path, subprocess.Popen]] = {}  # "heuristic seed 42" -> its folder and process
    lock = threading.Lock()  # over `running` and `stopping`: no run starts once the comparison stops
    stopping = threading.Event()

    def run(arm: Arm, block: list[int], threads: int) -> None:
        """The arm's runs of `block` (consecutive seeds): one seed, or a group of a grouped arm's in one
        process, with `threads` CPU threads."""
        grafts = {seed: final_architecture(results[arm.graft_from][seed]) for seed in block} if arm.graft_from else {}
        started = time.perf_counter()
        label = f"{arm.name} seed {block[0]}" + (f"-{block[-1]}" if len(block) > 1 else "")
        with lock:
            if stopping.is_set():
                return
            proc = subprocess.Popen(train_command(cfg, arm, block, grafts), stdout=subprocess.DEVNULL,
                                    env=os.environ | {"OMP_NUM_THREADS": str(threads)},
                                    stderr=subprocess.PIPE, text=True)
            running[label] = (runs_dir(cfg, arm, block[0]), proc)
        try:
            _, stderr = proc.communicate()
        finally:
            with lock:
                del running[label]
        if proc.returncode != 0:  # its last line says why; the whole of it (a traceback) is kept beside its runs
            said = runs_dir(cfg, arm, block[0]) / "stderr.txt"
            said.parent.mkdir(parents=True, exist_ok=True)
            said.write_text(stderr)
            why = stderr.strip().splitlines()[-1].removeprefix("esper: error: ") if stderr.strip() else "no message"
            raise RunFailed(f"{label} failed (exit status {proc.returncode}): {why} (all it wrote: {said})")
        key, what = headline(cfg.task)
        for seed in block:
            found = list(runs_dir(cfg, arm, seed).glob("*/summary.json"))
            if len(found) != 1:
                raise RunFailed(f"{label} left {len(found)} run summaries in {runs_dir(cfg, arm, seed)}, not one")
            results[arm.name][seed] = json.loads(found[0].read_text())
            log(f"{arm.name:>13} seed {seed}: {what} {results[arm.name][seed][key]:.3f}  "
                f"({time.perf_counter() - started:.0f}s)")

    def stop_runs() -> None:
        """End the runs in flight (SIGTERM) and start no other: a comparison that is stopped leaves no run
        training behind it, which a `--resume` would then start again beside it."""
        with lock:
            stopping.set()
            for _, proc in running.values():
                proc.terminate()

    def finished() -> dict[str, list[dict]]:
        return {name: [by_seed[s] for s in seeds] for name, by_seed in results.items() if len(by_seed) == len(seeds)}

    def say_progress(stop: threading.Event) -> None:
        no_epoch = ("starting" if cfg.telemetry_level in ("normal", "debug")
                    else f"running (--telemetry-level {cfg.telemetry_level} records no epochs)")
        while not stop.wait(cfg.progress_every):
            with lock:
                folders = {label: folder for label, (folder, _) in running.items()}
            now = [f"{label}: {progress_of(folder, cfg.task) or no_epoch}" for label, folder in folders.items()]
            if now:
                log("  running: " + "; ".join(now))

    stop = threading.Event()
    if cfg.progress_every > 0:
        threading.Thread(target=say_progress, args=(stop,), daemon=True).start()
    try:
        for phase in phases(arms):
            jobs = []
            for arm in phase:
                jobs += [(arm, block) for block in blocks_to_train(cfg, arm, seeds, results[arm.name], log)]
            with ThreadPoolExecutor(cfg.workers) as pool:
                _, threads = sharing(cfg, phase)  # a resumed run gets the threads it had: its numbers depend on them
                pending = {pool.submit(run, arm, block, threads) for arm, block in jobs}
                try:
                    if pending and on_wake is not None:
                        on_wake()  # once as they start: a run failing within the first second still had begun
                    while pending:  # wake each second: a signal's handler runs in this thread
                        done, pending = wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
                        for future in done:  # any run's failure, whichever was submitted first
                            future.result()
                        if on_wake is not None:
                            on_wake()
                except BaseException:  # a run failed, Ctrl-C or SIGTERM: no run goes on or starts
                    stop_runs()
                    pool.shutdown(cancel_futures=True)
                    raise
            if on_phase is not None:
                on_phase(finished())
    finally:
        stop.set()
    return finished()


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its t-interval (nan for a single value: one seed gives no interval)."""
    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return float(a.mean()), math.nan
    half = stats.t.ppf(0.5 + confidence / 2, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a))
    return float(a.mean()), float(half)


def headline(task: str) -> tuple[str, str]:
    """(summary key, label): test accuracy for classifiers, test loss for a language model (its perplexity
    is exp of it). Never a validation figure: the growing arms' decisions were made on that split."""
    if HOSTS[task].kind == "transformer":
        return "test_loss", "test loss"
    return "test_accuracy", "test accuracy"


def perplexity(loss: float) -> float:
    """exp of a mean test loss; inf past what a float holds (a diverged model's finite but huge loss)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def mean_flops(runs: list[dict]) -> float:
    """An arm's mean training FLOPs over its runs."""
    return float(np.mean([r["train_flops"] for r in runs]))


def shown_ci(value: tuple[float, float], spec: str) -> str:
    """mean_ci's (mean, half-width) as "72.40 ± 1.23" (`spec` the mean's format), "72.40 ± n/a" for one seed,
    "not finite" where a run's value was not (a diverged language model's loss)."""
    mean, half = value
    if not math.isfinite(mean):
        return "not finite"
    return f"{mean:{spec}} ± " + ("n/a" if math.isnan(half) else f"{half:{spec.lstrip('+')}}")


def paired(runs: list[dict], against: list[dict], key: str) -> str:
    """The mean difference of `runs` minus `against` in `key`, each run against the run of its seed, with its
    95% CI."""
    base = {r["seed"]: r[key] for r in against}
    if sorted(r["seed"] for r in runs) != sorted(base):
        raise ValueError("paired arms must hold the same seeds")
    diff = mean_ci([r[key] - base[r["seed"]] for r in runs])
    return shown_ci(diff, "+.3f" if key == "test_loss" else "+.2f")


PAIRINGS = (("ppo", "heuristic"), ("heuristic", "from-scratch"), ("heuristic", "static@10"))
"""Arms paired with another than static, each line beneath the table: the learned controller against the
rule-based one (its seeds all held out from its training); growth against its own final architectures trained
from the start, what it must match to be worth growing; growth against the original table's unmatched
baseline, that table's kind of headline."""


def pairing_lines(cfg: CompareConfig, results: dict[str, list[dict]]) -> list[str]:
    """One line for each of PAIRINGS whose arms both finished: the paired difference and the training FLOPs."""
    key, label = headline(cfg.task)
    lines = []
    for arm, base in PAIRINGS:
        if {arm, base} <= results.keys():
            flops = mean_flops(results[arm]) / mean_flops(results[base])
            lines.append(f"{arm} against {base}, {label} paired by seed (95% CI): "
                         f"{paired(results[arm], results[base], key)}, with {flops:.2f}x its training FLOPs.")
    if ORIGINAL_STATIC.name in results:
        lines.append(f"{ORIGINAL_STATIC.name} is the original table's unmatched baseline, shown for reference only: "
                     f"{ORIGINAL_STATIC.max_epochs} epochs against the other arms' {cfg.max_epochs}. Growth is "
                     "measured against static, at the same steps.")
    return lines


def results_table(cfg: CompareConfig, results: dict[str, list[dict]]) -> str:
    arms = {a.name: a for a in arms_for(cfg.budget, cfg.max_epochs, list(cfg.arms))}
    key, label = headline(cfg.task)
    static_flops = mean_flops(results["static"]) if "static" in results else None
    lines = [
        f"| arm | epochs | same steps | {label} (95% CI) | vs static, paired (95% CI) | final params "
        "| training FLOPs | FLOPs vs static | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        value = mean_ci([r[key] for r in runs])
        vs = paired(runs, results["static"], key) if "static" in results and name != "static" else "-"
        flops = mean_flops(runs)
        shown = (f"{shown_ci(value, '.3f')} (perplexity {perplexity(value[0]):.2f})"
                 if key == "test_loss" else shown_ci(value, ".2f"))
        lines.append(
            f"| {name} | {arms[name].max_epochs} | {'yes' if arms[name].same_steps else 'no'} "
            f"| {shown} | {vs} | {np.mean([final_params(r) for r in runs]):,.0f} "
            f"| {flops:.3g} | {f'{flops / static_flops:.2f}x' if static_flops else '-'} "
            f"| {np.mean([r['wall_seconds'] for r in runs]):.0f} |"
        )
    return "\n".join(lines)


STAGE_COLOURS = {"DORMANT": "#eeeeee", "GERMINATED": "#9ecae1", "TRAINING": "#3182bd", "BLENDING": "#fd8d3c",
                 "FOSSILIZED": "#31a354", "CULLED": "#de2d26", "EMBARGOED": "#756bb1"}


def plot(results: dict[str, list[dict]], out: Path, task: str) -> list[str]:
    """curves.png (validation accuracy or loss with a 95% band, and parameters), timeline.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    curve_key, curve_label = (("val_loss", "validation loss") if headline(task)[0] == "test_loss"
                              else ("val_accuracy", "validation accuracy (%)"))
    fig, (ax_acc, ax_par) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in results.items():
        epochs = [p["epoch"] for p in runs[0]["curve"]]
        acc = np.array([[p[curve_key] for p in r["curve"]] for r in runs])  # [seeds, epochs]
        params = np.array([[p["total_params"] for p in r["curve"]] for r in runs])
        band = [mean_ci(list(col))[1] for col in acc.T]
        ax_acc.plot(epochs, acc.mean(0), label=name)
        ax_acc.fill_between(epochs, acc.mean(0) - band, acc.mean(0) + band, alpha=0.2)
        ax_par.plot(epochs, params.mean(0), label=name)
    ax_acc.set(xlabel="epoch", ylabel=curve_label, title="Validation (mean, 95% CI)")
    ax_par.set(xlabel="epoch", ylabel="parameters", title="Parameters (mean over seeds)")
    for ax in (ax_acc, ax_par):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.legend(), ax_par.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(results), 1, figsize=(12, 1.2 + 0.9 * len(results)), squeeze=False)
    for ax, (name, runs) in zip(axes[:, 0], results.items()):
        curve = runs[0]["curve"]
        slots = list(curve[0]["stages"])
        for row, slot in enumerate(slots):
            for point in curve:
                ax.barh(row, 1, left=point["epoch"] - 1, color=STAGE_COLOURS[point["stages"][slot]])
        ax.set_yticks(range(len(slots)), slots)
        ax.set_title(f"{name}, seed {runs[0]['seed']}", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("epoch")
    fig.legend(handles=[Patch(color=c, label=s) for s, c in STAGE_COLOURS.items()], loc="upper right", ncol=7,
               fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(out / "timeline.png", dpi=110)
    plt.close(fig)
    return ["curves.png", "timeline.png"]


def walls_shared(cfg: CompareConfig) -> str:
    """How the runs of each phase shared the machine, in words."""
    cpu = not cfg.device.startswith("cuda")
    said = []
    for phase in phases(arms_for(cfg.budget, cfg.max_epochs, list(cfg.arms))):
        if phase:
            at_once, threads = sharing(cfg, phase)
            said.append(f"{', '.join(a.name for a in phase)} ran {at_once} at once"
                        + (f" with {threads} CPU thread{'s' if threads > 1 else ''} each" if cpu else ""))
    return "; then ".join(said)


def device_name(device: str) -> str:
    """The card a comparison's runs train on, or the CPU with its cores, as its report names them."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores)"


def ran_differently(ran_with: list[dict]) -> list[str]:
    """A line for a comparison whose invocations ran with other settings (wall.json's `ran_with`, one entry
    each), naming those that differed; none when they all ran alike."""
    differ = [k for k in ran_with[0] if len({json.dumps(r.get(k)) for r in ran_with}) > 1] if ran_with else []
    if not differ:
        return []
    each = "; ".join(f"{i}: " + ", ".join(f"{k} {r.get(k)}" for k in differ) for i, r in enumerate(ran_with, 1))
    return [f"Its invocations ran with other settings ({each}). Each run trained whole within one invocation; "
            "the device, settings and sharing said above are the last one's."]


def write_report(cfg: CompareConfig, results: dict[str, list[dict]], seconds: float, invocations: int = 1,
                 ran_with: list[dict] = ()) -> Path:
    out = Path(cfg.out_dir)
    images = plot(results, out, cfg.task)
    device = device_name(cfg.device)
    batch_size = TrainConfig.for_task(cfg.task).batch_size  # as `esper train` trains the task
    spread = f" over {invocations} invocations (interrupted and resumed)" if invocations > 1 else ""
    fates = {arm: fates_in_words(sum((Counter(r["seed_counts"]) for r in runs), Counter()))
             for arm, runs in results.items() if arm in ("heuristic", "ppo")}  # seeds' fates over all runs
    key = headline(cfg.task)[0]
    missing = [a.name for a in arms_for(cfg.budget, cfg.max_epochs, list(cfg.arms)) if a.name not in results]
    text = [
        f"# esper compare: {cfg.task}",
        "",
        f"{cfg.seeds} seeds from {cfg.seed}; {cfg.max_epochs} epochs x "
        f"{cfg.max_batches or 'all'} batches of {batch_size}; slots {' '.join(cfg.slots)}; device {device}; "
        f"torch {torch.__version__}; {cfg.precision}{', compiled' if cfg.compile else ''}; "
        f"memory format {cfg.memory_format}{', cuDNN benchmark mode' if cfg.cudnn_benchmark else ''}"
        f"{'' if cfg.cuda_graph else ', no CUDA graphs'}; "
        f"up to {cfg.workers} run{'s' if cfg.workers > 1 else ''} at once"
        f"{f' (each arm grouped: up to {GROUP_EPISODES} of its seeds in one run)' if cfg.grouped else ''}; "
        f"total wall {seconds:.0f} s{spread}.",
        "The test split is evaluated once per run, at the end; every decision used the validation split.",
        "",
        results_table(cfg, results),
        "",
        "Same steps: the same epochs of the same batches (data, order and optimizer settings alike) as the "
        "other arms. No arm is matched in FLOPs: what a step costs depends on the architecture, hence the FLOPs "
        "columns: the forward and backward convolutions and matrix products of every training step, attention's "
        "included (torch's FlopCounterMode); the evaluation passes (validation with its counterfactual copies, "
        "and test) are not counted. Each interval is a 95% interval on its own, not corrected for the several "
        "comparisons."
        + (" Perplexity: exp of the mean test loss." if key == "test_loss" else ""),
        f"wall s: the mean of the runs' own wall times. They compare within a phase only: {walls_shared(cfg)}.",
        *ran_differently(list(ran_with)),
        "",
        *[f"Seeds of the {arm} arm over all runs: {fates[arm]}." for arm in fates],
        *([f"The ppo arm's policy: `{cfg.policy}`."] if "ppo" in results else []),
        *pairing_lines(cfg, results),
        *([f"Not finished yet: {', '.join(missing)} (this report is rewritten as each phase ends)."] if missing
          else []),
        "",
        *[f"![{name}]({name})" for name in images],
        "",
    ]
    (out / "results.md").write_text("\n".join(text))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return out / "results.md"


class CompareBusy(RuntimeError):
    """Another process is writing the comparison's folder."""


class PolicyChanged(ValueError):
    """The policy file is not the one checked when the comparison began."""


POLICY_COPY = "policy.pt"
"""The ppo arm's policy, copied into the comparison's folder before any run: every run is decided by the
policy that was checked (its digest, its held-out seeds), even if the file is rewritten meanwhile (a PPO
run or a learner saving as it trains)."""


def copy_policy(cfg: CompareConfig, out: Path) -> None:
    """POLICY_COPY from cfg.policy, unless a resumed comparison has it; PolicyChanged if it is not the policy
    whose digest the comparison recorded (rewritten since it was checked)."""
    copy = out / POLICY_COPY
    if not copy.is_file():
        tmp = copy.with_name(copy.name + ".tmp")
        shutil.copyfile(cfg.policy, tmp)
        os.replace(tmp, copy)
    if file_sha256(copy) != cfg.policy_sha256:
        copy.unlink()
        raise PolicyChanged(f"--policy {cfg.policy} changed since it was checked: start the comparison again")


def compare(cfg: CompareConfig, log=print, resume: bool = False) -> Path:
    """Run the comparison into cfg.out_dir, or with `resume` finish the one there (same settings but
    RESUMABLE: the caller checks with `differences`). Its wall time adds up over the invocations in
    wall.json, rewritten each second (an invocation killed outright loses at most that second), with the
    settings each ran with (the report says where they differed); a resume that trains nothing is not counted.
    CompareBusy while another process writes the folder."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_exclusively(out / "compare.lock")  # held until this process ends, however it ends
    if lock is None:
        raise CompareBusy(f"{out} is being written by another esper compare: let it finish, or stop it and "
                          f"--resume {out}")
    with lock:
        write_atomic(out / "compare.json", json.dumps(asdict(cfg), indent=2))
        if cfg.policy:
            copy_policy(cfg, out)
        wall_file = out / "wall.json"
        before = {"seconds": 0.0, "invocations": 0, "ran_with": []}
        counted = not (resume and wall_file.is_file())  # a resume counts once it trains a run
        if not counted:
            try:
                saved = json.loads(wall_file.read_text())
                before = {"seconds": float(saved["seconds"]), "invocations": int(saved["invocations"]),
                          "ran_with": [dict(r) for r in saved.get("ran_with", [])]}
            except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:  # the results stand
                log(f"esper: warning: {wall_file} cannot be read ({type(exc).__name__}): the wall time counts this "
                    "invocation only")
                counted = True
        started = time.perf_counter()
        ran_with = {"device": device_name(cfg.device), "workers": cfg.workers, "gpu_preload": cfg.gpu_preload,
                    "cudnn_benchmark": cfg.cudnn_benchmark, "cuda_graph": cfg.cuda_graph}

        def wall() -> dict:
            if not counted:
                return before
            spent = {"seconds": before["seconds"] + time.perf_counter() - started,
                     "invocations": before["invocations"] + 1, "ran_with": [*before["ran_with"], ran_with]}
            write_atomic(wall_file, json.dumps(spent))
            return spent

        def training() -> None:  # about once a second while runs train
            nonlocal counted
            counted = True
            wall()

        def report(results: dict[str, list[dict]]) -> Path:
            return write_report(cfg, results, **wall())

        wall()
        try:
            run_all(cfg, log, on_phase=report, on_wake=training)  # the report is rewritten after each phase
        finally:
            wall()
        return out / "results.md"
