"""Regenerate docs/cli.md from the commands' --help (tests/test_docs.py checks it is current).

python docs/gen_cli.py
"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from erasekit.cli import app

COMMANDS = ["erase", "generate", "eval", "inspect", "apply", "diff", "merge", "export"]
OUT = Path(__file__).with_name("cli.md")


def render() -> str:
    runner = CliRunner()
    parts = [
        "# Command line reference",
        "",
        "Generated from `--help` by `python docs/gen_cli.py`; do not edit by hand.",
        "",
        "Exit codes: 0 success, 1 bad usage, 2 missing or unreadable input, 3 corrupt patch, 4 unknown or",
        "damaged checkpoint layout, 5 incompatible patch or fingerprint mismatch, 6 not applied / undo record",
        "problem, 7 target not writable, 8 non-finite values, 9 checkpoint locked by another erasekit,",
        "70 internal error. Errors are one line on stderr; `ERASEKIT_DEBUG=1` shows the traceback.",
        "",
    ]
    for args, title in [([], "erasekit"), *(([c], f"erasekit {c}") for c in COMMANDS)]:
        text = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "100"}).stdout.rstrip()
        parts += [f"## {title}", "", "```", text, "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    OUT.write_text(render())
    print(OUT)
