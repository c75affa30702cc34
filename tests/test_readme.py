"""The README's two set-up commands are what CI runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme.split("## Set up")[1].split("\n## ")[0], flags=re.S)
    assert len(commands) == 2, commands
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert commands[0] in ci_lines and commands[1] in ci_lines
    assert "accelerate launch recipes/train.py" in commands[0] and "pytest" in commands[1]
