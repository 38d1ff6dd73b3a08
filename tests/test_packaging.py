"""Declared dependency ranges agree with what CI proves and with what checkpoints record."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from hf_moe.modeling.configuration_moe import SUPPORTED_TRANSFORMERS

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    return {r.name.lower().replace("_", "-"): r for r in requirements}


def test_checkpoints_record_the_declared_transformers_range():
    assert str(declared()["transformers"].specifier) == str(Requirement(f"t{SUPPORTED_TRANSFORMERS}").specifier)


def test_every_range_is_bounded_and_ci_pins_its_lower_bound():
    pins = {}
    for line in (ROOT / ".ci" / "lowest-constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    for name, requirement in declared().items():
        bounds = {spec.operator: spec.version for spec in requirement.specifier}
        assert set(bounds) == {">=", "<"}, f"{name}: {requirement.specifier} needs a lower and an upper bound"
        assert name in pins, f"{name} has no pin in .ci/lowest-constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement.specifier}"
        assert Version(pins[name]) == Version(bounds[">="]), (
            f"{name}: CI pins {pins[name]}, the range starts at {bounds['>=']}"
        )
