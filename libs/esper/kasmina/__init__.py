"""Kasmina: hosts with slots, seed blueprints, the seed lifecycle, gradient isolation and export."""

from esper.kasmina.blueprints import build_seed, seed_param_count
from esper.kasmina.export import export_model, load_exported, save_exported
from esper.kasmina.hosts import HOSTS, build_host
from esper.kasmina.lifecycle import IllegalAction, LifecycleConfig
from esper.kasmina.model import MorphogeneticModel
from esper.kasmina.slot import SeedSlot

__all__ = [
    "HOSTS",
    "IllegalAction",
    "LifecycleConfig",
    "MorphogeneticModel",
    "SeedSlot",
    "build_host",
    "build_seed",
    "export_model",
    "load_exported",
    "save_exported",
    "seed_param_count",
]
