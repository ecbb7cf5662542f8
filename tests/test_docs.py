"""Docs that are generated or quoted stay in step with the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_cli_reference_is_current() -> None:
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from gen_cli import OUT, render
    finally:
        sys.path.pop(0)
    assert OUT.read_text() == render(), "docs/cli.md is stale: run python docs/gen_cli.py"


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    cmd = next(line.strip() for line in readme.splitlines() if re.match(r"^\s*python -m pytest", line))
    assert cmd in (ROOT / ".ci" / "run").read_text()


def test_changelog_mentions_current_version_section() -> None:
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()


def test_quickstart_example_runs(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", str(ROOT / "examples" / "quickstart.sh"), str(tmp_path)],
        capture_output=True,
        env=env,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bit-exact revert: yes" in r.stdout
