"""The README's quick start runs exactly as written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs_as_written(tmp_path):
    section = README.read_text().split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "tiny-switch" / "config.json").is_file()
    assert "SwitchMoe" not in result.stderr  # no warning about the model classes


def test_readme_gives_the_test_command_that_ci_runs():
    commands = re.findall(r"```bash\n(.*?)\n```", README.read_text(), re.S)
    ci = (README.parent / ".ci" / "run").read_text()
    test_commands = [c for c in commands if "pytest" in c]
    assert len(test_commands) == 1 and test_commands[0] in ci
    # The tests need the [dev] extra, the demo fine-tunes and needs [train].
    assert '".[dev]"' in test_commands[0]
    demo_commands = [c for c in commands if "recipes/demo.py" in c]
    assert len(demo_commands) == 1 and '".[train]"' in demo_commands[0]
