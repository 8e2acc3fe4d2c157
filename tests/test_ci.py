""".ci/run runs the README's test commands, verbatim."""
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def readme_test_commands():
    """The README's shell command lines that run the suite."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.endswith("python -m pytest")]


def test_ci_runs_the_readme_test_commands():
    commands = readme_test_commands()
    assert [command.split()[0] for command in commands] == ["python3", "python3.12"], commands
    script = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert any(line == command or line.startswith(f"{command} ||") for line in script), command
