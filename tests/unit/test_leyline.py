"""The generated leyline code matches proto/, and the enum helpers round-trip."""

import filecmp

import pytest

from esper.leyline import Blueprint, SeedStage, TelemetryLevel, from_short_name, short_name, short_names
from esper.leyline import codegen


def test_generated_code_is_fresh(tmp_path):
    """Regenerate into a temp dir: every file must equal the committed one byte for byte."""
    fresh = codegen.generate(tmp_path)
    assert fresh, "codegen produced nothing"
    committed = codegen.LIBS_ROOT / "esper" / "leyline"
    for path in fresh:
        target = committed / path.name
        assert target.exists(), f"{path.name} is generated but not committed: run python -m esper.leyline.codegen"
        assert filecmp.cmp(path, target, shallow=False), (
            f"{path.name} is stale: run python -m esper.leyline.codegen")
    orphans = {p.name for p in committed.glob("*_pb2*.py*")} - {p.name for p in fresh}
    assert not orphans, f"committed but no longer generated (its .proto is gone?): {sorted(orphans)}"


def test_short_names_round_trip():
    for enum in (SeedStage, Blueprint, TelemetryLevel):
        for name in short_names(enum):
            assert short_name(enum, from_short_name(enum, name)) == name
    assert short_name(SeedStage, SeedStage.SEED_STAGE_FOSSILIZED) == "FOSSILIZED"
    assert short_name(Blueprint, Blueprint.BLUEPRINT_CONV_HEAVY) == "conv_heavy"


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="conv_heavy"):
        from_short_name(Blueprint, "conv_gigantic")
