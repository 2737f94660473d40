"""Per run and slot: the seed's stage, alpha, blueprint and contribution at the last epoch."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from esper.leyline import Blueprint, EpochReport, SeedStage, SlotState, enum_name

STAGE_STYLE = {
    "DORMANT": "dim", "GERMINATED": "cyan", "TRAINING": "blue", "BLENDING": "magenta",
    "FOSSILIZED": "bold green", "CULLED": "red", "EMBARGOED": "yellow",
}
COLUMNS = ("run", "slot", "stage", "alpha", "blueprint", "contribution", "in stage")


class SlotTable(DataTable):
    """One row per (run, slot), updated in place: a PPO round shows each environment's episode."""

    max_runs = 8
    """Rows of older runs are dropped so the table keeps to the runs being watched."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", **kwargs)
        self._runs: list[str] = []

    def on_mount(self) -> None:
        for name in COLUMNS:
            self.add_column(name, key=name)

    def update_epoch(self, run_id: str, report: EpochReport) -> None:
        if run_id not in self._runs:
            self._runs.append(run_id)
            if len(self._runs) > self.max_runs:
                old = self._runs.pop(0)
                for key in [k for k in self.rows if k.value.startswith(f"{old}/")]:
                    self.remove_row(key)
        for slot in report.slots:
            key = f"{run_id}/{slot.slot}"
            cells = slot_cells(run_id, slot)
            if key in self.rows:
                for column, value in zip(COLUMNS, cells):
                    self.update_cell(key, column, value)
            else:
                self.add_row(*cells, key=key)


def slot_cells(run_id: str, slot: SlotState) -> tuple:
    stage = enum_name(SeedStage, slot.stage)
    blueprint = enum_name(Blueprint, slot.blueprint) if slot.blueprint else "-"
    contribution = (f"{slot.contribution:+.2f} ± {slot.contribution_se:.2f}" if slot.has_contribution else "-")
    # Text, not str: a DataTable reads a str cell as markup, and a run id ("w[/]") or slot name may hold brackets
    return (Text(run_id), Text(slot.slot), Text(stage, style=STAGE_STYLE.get(stage, "")), f"{slot.alpha:.2f}",
            blueprint, contribution, str(slot.epochs_in_stage))
