"""The example model cards in model_cards/examples/ are what the templates render for a real tiny run
(model_cards/examples/render_examples.py), so they cannot drift from the templates."""

import difflib
import re
import subprocess
import sys

from recipe_helpers import REPO

EXAMPLES = REPO / "model_cards" / "examples"
SCRIPT = EXAMPLES / "render_examples.py"
# Losses, deviations, load shares and versions change with the platform and the releases installed.
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def without_numbers(text: str) -> list[str]:
    return NUMBER.sub("<n>", text).splitlines()


def test_the_example_cards_are_what_the_templates_render(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cards = sorted(path.name for path in EXAMPLES.glob("*.md"))
    assert cards == ["exported.md", "finetuned.md", "imported.md", "upcycled.md"], cards
    for name in cards:
        committed, fresh = (EXAMPLES / name).read_text(), (tmp_path / name).read_text()
        assert str(tmp_path) not in fresh and "/tmp" not in committed, f"{name} names a temporary folder"
        diff = list(difflib.unified_diff(without_numbers(committed), without_numbers(fresh), lineterm="", n=1))
        assert not diff, f"model_cards/examples/{name} is stale; run {SCRIPT.relative_to(REPO)}:\n" + "\n".join(
            diff[:40]
        )
    for plot in ("expert_load.png", "loss_curves.png"):
        assert (EXAMPLES / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
        assert f"]({plot})" in (EXAMPLES / "finetuned.md").read_text(), f"finetuned.md does not show {plot}"
