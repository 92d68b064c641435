"""The linter runs clean: `ruff check .` with the rules in pyproject.toml ([tool.ruff.lint]).

A finding names the file, line and rule; fix it, or turn the rule off in pyproject.toml with its reason
(or `# noqa: RULE (why)` on the one line where the rule is wrong)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_rules_are_chosen_not_defaulted():
    """An explicit selection, so a ruff upgrade's new default rules do not turn CI red overnight."""
    text = (ROOT / "pyproject.toml").read_text()
    assert "[tool.ruff.lint]" in text and "select = [" in text
