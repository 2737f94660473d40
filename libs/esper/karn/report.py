"""`esper report RUN...`: a Markdown report of runs from the analytics store, with PNG plots.

Plots are drawn with matplotlib's Agg backend (no display needed) and linked from the Markdown by
relative path, so the folder can be moved or attached as a whole.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from esper.karn.runs_db import RunsDB  # noqa: E402


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def runs_table(db: RunsDB, run_ids: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "mode", "task", "epochs", "val %", "best val %", "test %", "val loss", "test loss", "params",
              "seeds (fossilized/culled)"]
    rows = []
    for r in db.runs(run_ids):
        seeds = db.seeds(r["run_id"])
        fates = Counter(s["fate"] for s in seeds)
        grown = f"{len(seeds) - fates['grafted']} ({fates['fossilized']}/{fates['culled']})"
        grown += f", {fates['grafted']} grafted" if fates["grafted"] else ""
        rows.append([r["run_id"], r["mode"] or "-", r["task"] or "-", _fmt(r["epochs"], "d"),
                     _fmt(r["val_accuracy"], ".2f"), _fmt(r["best_val_accuracy"], ".2f"),
                     _fmt(r["test_accuracy"], ".2f") if r["finished"] else "-", _fmt(r["val_loss"], ".3f"),
                     _fmt(r["test_loss"], ".3f") if r["finished"] else "-", _fmt(r["total_params"], ",d"), grown])
    return header, rows


def blueprint_table(db: RunsDB, run_ids: list[str] | None) -> tuple[list[str], list[list[str]]]:
    header = ["blueprint", "slot", "germinated", "fossilized", "culled", "live", "grafted", "mean contribution (pts)"]
    rows = [[b["blueprint"], b["slot"], str(b["germinated"]), str(b["fossilized"]), str(b["culled"]), str(b["live"]),
             str(b["grafted"]), _fmt(b["mean_contribution"], "+.2f")] for b in db.blueprint_stats(run_ids)]
    return header, rows


def write_report(db: RunsDB, run_ids: list[str], out_dir: Path) -> Path:
    """Write `out_dir/report.md` and its plots; returns the Markdown file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot_curves(db, run_ids, out_dir / "val_accuracy.png", "val_accuracy", "validation accuracy (%)")
    _plot_curves(db, run_ids, out_dir / "val_loss.png", "val_loss", "validation loss")
    _plot_accuracy_vs_params(db, run_ids, out_dir / "accuracy_vs_params.png")
    _plot_fates(db, run_ids, out_dir / "seed_fates.png")
    sections = [
        f"# Esper report: {len(run_ids)} run{'s' if len(run_ids) != 1 else ''}",
        "## Runs", markdown_table(*runs_table(db, run_ids)),
        "## Validation accuracy", "![validation accuracy per epoch](val_accuracy.png)",
        "## Validation loss", "A language model is judged by its loss (its perplexity is exp of it), not by how often "
        "its likeliest next token is right.", "![validation loss per epoch](val_loss.png)",
        "## Accuracy against parameters", "![accuracy against parameters](accuracy_vs_params.png)",
        "## Seeds by blueprint and slot",
        "A seed's contribution is the last one measured for it: validation accuracy with it minus without it.",
        markdown_table(*blueprint_table(db, run_ids)), "![seed fates per blueprint](seed_fates.png)",
    ]
    path = out_dir / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path


@contextmanager
def _figure(path: Path, width: float):
    """An Axes to draw on; the figure gets a legend (beside the plot, so it covers nothing: `width` leaves
    it room) and is written to `path` (and freed) afterwards."""
    fig, ax = plt.subplots(figsize=(width, 4))
    yield ax
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(db: RunsDB, run_ids: list[str], path: Path, column: str, label: str) -> None:
    with _figure(path, width=11) as ax:  # the legend names runs: room for their ids
        for run_id in run_ids:
            curve = db.curve(run_id)
            if not curve:  # a PPO learner's own run: its episodes are the runs with epochs
                continue
            ax.plot([c["epoch"] for c in curve], [c[column] for c in curve], label=run_id)
        ax.set(xlabel="epoch", ylabel=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)


def _plot_accuracy_vs_params(db: RunsDB, run_ids: list[str], path: Path) -> None:
    runs = [r for r in db.accuracy_vs_params(run_ids) if r["total_params"] is not None]  # a run with no epoch: no point
    with _figure(path, width=8) as ax:
        for mode in sorted({r["mode"] or "-" for r in runs}):
            points = [r for r in runs if (r["mode"] or "-") == mode]
            ax.scatter([r["total_params"] for r in points], [r["val_accuracy"] for r in points], label=mode)
        ax.set(xlabel="parameters (host + seeds)", ylabel="final validation accuracy (%)")
        ax.grid(alpha=0.3)


def _plot_fates(db: RunsDB, run_ids: list[str], path: Path) -> None:
    stats = db.blueprint_stats(run_ids)
    labels = [f"{b['blueprint']}\n{b['slot']}" for b in stats]
    with _figure(path, width=max(4, len(stats) * 1.1) + 1.5) as ax:
        bottom = [0] * len(stats)
        for fate, colour in (("fossilized", "tab:green"), ("culled", "tab:red"), ("live", "tab:gray"),
                             ("grafted", "tab:blue")):
            heights = [b[fate] for b in stats]
            ax.bar(labels, heights, bottom=bottom, label=fate, color=colour)
            bottom = [a + h for a, h in zip(bottom, heights)]
        ax.set(ylabel="seeds")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
