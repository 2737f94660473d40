"""Export a grown network as a plain nn.Sequential: no slots, no stages, identical outputs.

On disk an export is `architecture.json` (host name and the seeds it kept, in order) plus
`weights.pt` (a state_dict, loaded with weights_only=True), so a reader needs no pickled classes. An
image network takes images as training gave them: x / 255 standardized per channel with the training
set's statistics, which architecture.json keeps as `input_mean` and `input_std`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from esper.kasmina.blueprints import build_seed
from esper.kasmina.hosts import build_host
from esper.leyline import Blueprint, SeedStage, from_short_name, short_name


class Residual(nn.Module):
    """x + scale * f(x): a fossilized seed (scale 1) or a seed frozen mid-blend (scale alpha)."""

    def __init__(self, f: nn.Module, scale: float):
        super().__init__()
        self.f = f
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.f(x) if self.scale != 1.0 else x + self.f(x)


def architecture(model) -> dict:
    """The seeds that change the output: fossilized ones, and blending ones at their current alpha."""
    kept = []
    for after, name in sorted(model.slot_after.items()):
        slot = model.slots[name]
        if slot.stage in (SeedStage.SEED_STAGE_FOSSILIZED, SeedStage.SEED_STAGE_BLENDING):
            kept.append({"slot": name, "after_block": after, "channels": slot.channels,
                         "blueprint": short_name(Blueprint, slot.blueprint), "scale": slot.alpha})
    return {"host": model.host.spec.name, "kind": model.host.spec.kind, "seeds": kept}


def _assemble(host, arch: dict, seeds: dict[int, nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = [host.stem]
    scales = {s["after_block"]: s["scale"] for s in arch["seeds"]}
    for i, block in enumerate(host.blocks):
        layers.append(block)
        if i in seeds:
            layers.append(Residual(seeds[i], scales[i]))
    layers.append(host.head)
    return nn.Sequential(*layers)


def export_model(model) -> nn.Sequential:
    """A deep copy of the grown network as plain layers."""
    arch = architecture(model)
    seeds = {s["after_block"]: model.slots[s["slot"]].seed for s in arch["seeds"]}
    return copy.deepcopy(_assemble(model.host, arch, seeds))


def save_exported(model, directory: Path, input_mean: tuple[float, ...] = (),
                  input_std: tuple[float, ...] = ()) -> None:
    """`input_mean`, `input_std`: the per-channel statistics images were standardized with (none for tokens)."""
    directory.mkdir(parents=True, exist_ok=True)
    net = export_model(model)
    arch = architecture(model) | ({"input_mean": list(input_mean), "input_std": list(input_std)} if input_mean else {})
    (directory / "architecture.json").write_text(json.dumps(arch, indent=2))
    tmp = directory / "weights.pt.tmp"
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, directory / "weights.pt")


def load_exported(directory: Path, map_location: str | torch.device = "cpu") -> nn.Sequential:
    """Rebuild an export, in eval mode (BatchNorm uses its running statistics)."""
    arch = json.loads((directory / "architecture.json").read_text())
    host = build_host(arch["host"])
    seeds = {
        s["after_block"]: build_seed(from_short_name(Blueprint, s["blueprint"]), s["channels"], arch["kind"])
        for s in arch["seeds"]
    }
    net = _assemble(host, arch, seeds)
    try:
        weights = torch.load(directory / "weights.pt", map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # whatever torch.load makes of a file that is not one (UnpicklingError, RuntimeError)
        raise ValueError(f"{directory / 'weights.pt'} is not a weights file (torch.load: {type(exc).__name__})") \
            from None
    net.load_state_dict(weights)
    if not_finite := [name for name, tensor in net.state_dict().items() if not tensor.isfinite().all()]:
        raise ValueError(f"weights that are not finite: {', '.join(not_finite[:3])}")  # sampling had failed on them
    return net.eval()
