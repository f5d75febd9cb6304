"""CI runs the README's test command, and that command installs what the tests import."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    at = lines.index("Install and run the tests (CPU; GPU tests are marked `gpu` and skip without CUDA):")
    return next(line for line in lines[at + 1:] if line.startswith("pip install"))


def test_ci_runs_the_readmes_test_command_with_the_hf_extra():
    command = readme_test_command()
    assert '".[test,hf]"' in command and "pytest" in command
    assert command in (ROOT / ".ci" / "run").read_text()
