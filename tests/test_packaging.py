"""Declared dependencies: lower bounds CI proves, no cap below the next major version, a small core;
checkpoints record the transformers releases their code runs on, and refuse an older one in one message."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from hf_moe import SwitchMoeConfig, SwitchMoeForCausalLM
from hf_moe.modeling.configuration_moe import HF_MOE_VERSION, MIN_TRANSFORMERS, TESTED_TRANSFORMERS
from hf_moe.optional_dependencies import TRAIN_EXTRA, TRAIN_PACKAGES

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()
PROJECT = tomllib.loads(PYPROJECT)["project"]
CORE = ("torch", "transformers", "safetensors", "huggingface-hub", "jinja2", "psutil")
# .ci/run sets it to the suite it runs ("newest" or "lowest"); unset outside CI.
CI_SUITE = os.environ.get("HF_MOE_CI_SUITE")
# .ci/run sets it to the python of a venv with a transformers release older than MIN_TRANSFORMERS.
OLD_TRANSFORMERS_PYTHON = os.environ.get("HF_MOE_OLD_TRANSFORMERS_PYTHON")


def requirements(group: str | None = None) -> dict[str, Requirement]:
    """The core's requirements, or an extra's (without the extras it includes)."""
    lines = PROJECT["dependencies"] if group is None else PROJECT["optional-dependencies"][group]
    return {canonicalize_name(r.name): r for r in map(Requirement, lines) if canonicalize_name(r.name) != "hf-moe"}


def declared() -> dict[str, Requirement]:
    return {**requirements(), **requirements("train"), **requirements("dev")}


def test_every_lower_bound_is_what_ci_pins():
    pins = {}
    for line in (ROOT / ".ci" / "lowest-constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    assert set(pins) == set(declared()), f"pinned but not declared: {set(pins) - set(declared())}"
    for name, requirement in declared().items():
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"{name}: {requirement.specifier} needs one lower bound (>=)"
        assert Version(pins[name]) == Version(lower[0]), f"{name}: CI pins {pins[name]}, the range starts at {lower[0]}"


def test_no_cap_below_the_next_major_version_unless_a_break_is_named():
    for name, requirement in declared().items():
        lower = Version(next(spec.version for spec in requirement.specifier if spec.operator == ">="))
        next_major = Version(str(lower.major + 1))  # 1.0 for 0.x releases
        for spec in requirement.specifier:
            assert spec.operator in (">=", "<"), f"{name}: {spec} (only >= and < are used)"
            if spec.operator == "<" and Version(spec.version) != next_major:
                line = next(line for line in PYPROJECT.splitlines() if line.strip().startswith(f'"{requirement.name}'))
                assert "#" in line, f"{name}: {spec} caps below {next_major} without a comment naming the break"


def test_the_core_is_small_and_train_matches_the_error_that_names_it():
    assert set(requirements()) == set(CORE)
    assert set(requirements("train")) == {canonicalize_name(d) for d in TRAIN_PACKAGES.values()}
    assert "hf-moe[train]" in PROJECT["optional-dependencies"]["dev"]
    assert TRAIN_EXTRA == 'pip install "hf-moe[train]"'


def test_checkpoints_record_the_declared_transformers_lower_bound():
    lower = next(s.version for s in declared()["transformers"].specifier if s.operator == ">=")
    assert Version(MIN_TRANSFORMERS) == Version(lower)
    assert Version(TESTED_TRANSFORMERS) >= Version(MIN_TRANSFORMERS)


def test_the_recorded_releases_are_the_ones_ci_runs():
    installed = Version(transformers.__version__)
    assert installed >= Version(MIN_TRANSFORMERS)
    if CI_SUITE == "newest":
        assert installed == Version(TESTED_TRANSFORMERS), (
            f"CI ran transformers {installed}: set TESTED_TRANSFORMERS in hf_moe/modeling/configuration_moe.py to it"
        )
    elif CI_SUITE == "lowest":
        assert installed == Version(MIN_TRANSFORMERS)


def test_checkpoint_code_under_an_older_transformers_names_the_required_release(tmp_path):
    if not OLD_TRANSFORMERS_PYTHON:
        message = "set HF_MOE_OLD_TRANSFORMERS_PYTHON to the python of a venv with transformers older than " + (
            f"{MIN_TRANSFORMERS} (.ci/run does)"
        )
        if CI_SUITE:
            pytest.fail(message)
        pytest.skip(message)
    config = SwitchMoeConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
        num_experts=2,
    )
    torch.manual_seed(0)
    SwitchMoeForCausalLM(config).save_pretrained(tmp_path / "moe")
    saved = json.loads((tmp_path / "moe" / "config.json").read_text())
    loader = textwrap.dedent(
        """
        import sys
        import transformers
        print(transformers.__version__, flush=True)
        transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
        """
    )
    result = subprocess.run(
        [OLD_TRANSFORMERS_PYTHON, "-c", loader, str(tmp_path / "moe")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    old = result.stdout.split()[0]
    assert Version(old) < Version(saved["hf_moe_min_transformers"]), f"transformers {old} is not older: proves nothing"
    assert result.returncode != 0, result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"ImportError: This checkpoint's code (hf_moe {HF_MOE_VERSION}) needs transformers>={MIN_TRANSFORMERS} "
        f"(tested with {TESTED_TRANSFORMERS}), but transformers {old} is installed: "
        f'pip install "transformers>={MIN_TRANSFORMERS}"'
    ), result.stderr[-3000:]
    assert not re.search(r"cannot import name|SubConfigSpec", result.stderr), result.stderr[-3000:]


def test_without_the_train_extra_hf_moe_imports_and_training_names_the_extra(tmp_path):
    # The [train] packages are made unimportable (None in sys.modules), as in a core-only install.
    code = textwrap.dedent(
        """
        import sys
        for name in ("accelerate", "datasets", "matplotlib", "peft", "tensorboard", "trl"):
            sys.modules[name] = None
        import hf_moe, hf_moe.cli, hf_moe.upcycling
        for use in ("import hf_moe.training", "hf_moe.compare_runs(['run'], output_dir='out')"):
            try:
                exec(use)
            except ImportError as error:
                print(error)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        f"hf_moe.training needs the [train] extra (accelerate, datasets, matplotlib, peft, tensorboard, trl not "
        f"installed): {TRAIN_EXTRA}",
        "the loss-curve plot of hf-moe compare (compare_runs with output_dir) needs the [train] extra (matplotlib "
        f"not installed): {TRAIN_EXTRA}",
    ]
    assert not (tmp_path / "out").exists()


def test_the_build_installs_every_package_and_the_model_card_templates_from_model_cards():
    """The wheel's packages are listed in pyproject.toml (setuptools' package-dir needs a list): every folder
    of hf_moe/ with an __init__.py, plus model_cards/ as hf_moe.card_templates with its templates as package
    data. .ci/wheel_check.py builds the wheel and checks the installed templates equal model_cards/*.md."""
    setuptools_config = tomllib.loads(PYPROJECT)["tool"]["setuptools"]
    folders = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "hf_moe").rglob("__init__.py")}
    assert set(setuptools_config["packages"]) == folders | {"hf_moe.card_templates"}
    assert setuptools_config["package-dir"] == {"hf_moe.card_templates": "model_cards"}
    assert setuptools_config["package-data"] == {"hf_moe.card_templates": ["*.md"]}
    templates = sorted(path.stem for path in (ROOT / "model_cards").glob("*.md"))
    assert templates == ["exported", "finetuned", "imported", "upcycled"], templates
    assert not (ROOT / "hf_moe" / "card_templates").exists(), "the templates live in model_cards/ only"


def test_an_editable_install_reads_the_card_templates_from_model_cards():
    """The tests run on an editable install (pip install -e ., as CI and the README do)."""
    from hf_moe import cards

    assert Path(str(cards.TEMPLATES)).resolve() == ROOT / "model_cards"
    assert cards.read_template("upcycled") == (ROOT / "model_cards" / "upcycled.md").read_text(encoding="utf-8")
