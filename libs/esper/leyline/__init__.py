"""Leyline: the message and enum contracts every Esper component speaks, generated from proto/.

Everything else imports messages and enums from here, never from the generated module directly.
"""

from __future__ import annotations

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from esper.leyline.leyline_pb2 import (
    Action,
    Blueprint,
    Decision,
    EpochReport,
    GateCheck,
    GovernorEvent,
    LayerGradient,
    LifecycleTransition,
    Observation,
    Operation,
    PPOUpdate,
    RunFinished,
    RunStarted,
    SeedStage,
    SlotState,
    TelemetryEvent,
    TelemetryLevel,
    TrainingSignals,
)
from esper.leyline.bus_pb2 import SnapshotReply, SnapshotRequest
from esper.leyline.simic_pb2 import AckStatus, PolicyWeights, TrajectoryAck, TrajectoryHeader
from esper.leyline.tamiyo_pb2 import (
    DecideBatchRequest,
    DecideBatchResponse,
    DecideRequest,
    DecideResponse,
    PolicyInfo,
    PolicyInfoRequest,
)

_PREFIXES = {
    "SeedStage": "SEED_STAGE_",
    "Blueprint": "BLUEPRINT_",
    "Operation": "OPERATION_",
    "TelemetryLevel": "TELEMETRY_LEVEL_",
}


def short_name(enum: EnumTypeWrapper, value: int) -> str:
    """SEED_STAGE_DORMANT -> "DORMANT"; BLUEPRINT_CONV_HEAVY -> "conv_heavy" (blueprints and
    telemetry levels are lower case, as users type them on the command line)."""
    name = enum.Name(value).removeprefix(_PREFIXES[enum.DESCRIPTOR.name])
    return name.lower() if enum.DESCRIPTOR.name in ("Blueprint", "TelemetryLevel") else name


def from_short_name(enum: EnumTypeWrapper, name: str) -> int:
    """Inverse of short_name; raises ValueError naming the choices."""
    try:
        return enum.Value(_PREFIXES[enum.DESCRIPTOR.name] + name.upper())
    except ValueError:
        choices = ", ".join(short_names(enum))
        raise ValueError(f"unknown {enum.DESCRIPTOR.name} {name!r} (choices: {choices})") from None


def enum_name(enum: EnumTypeWrapper, value: int) -> str:
    """short_name, but a value this build does not know (proto3 enums are open: a peer of a newer build, or a
    hostile one) is "unknown"."""
    return short_name(enum, value) if value in enum.values() else "unknown"


def short_names(enum: EnumTypeWrapper) -> list[str]:
    """Every value but UNSPECIFIED, by short name, in declaration order."""
    return [short_name(enum, v) for v in enum.values() if v != 0]


__all__ = [
    "AckStatus",
    "Action",
    "Blueprint",
    "DecideBatchRequest",
    "DecideBatchResponse",
    "DecideRequest",
    "DecideResponse",
    "Decision",
    "EpochReport",
    "GateCheck",
    "GovernorEvent",
    "LayerGradient",
    "LifecycleTransition",
    "Observation",
    "Operation",
    "PPOUpdate",
    "PolicyInfo",
    "PolicyInfoRequest",
    "PolicyWeights",
    "RunFinished",
    "RunStarted",
    "SeedStage",
    "SlotState",
    "SnapshotReply",
    "SnapshotRequest",
    "TelemetryEvent",
    "TelemetryLevel",
    "TrainingSignals",
    "TrajectoryAck",
    "TrajectoryHeader",
    "enum_name",
    "from_short_name",
    "short_name",
    "short_names",
]
