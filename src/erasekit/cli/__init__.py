"""The ``erasekit`` command line: a thin skin over the library (one module per command)."""

from __future__ import annotations

import typer

from .._version import __version__
from . import apply as _apply
from . import diff as _diff
from . import erase as _erase
from . import eval as _eval
from . import export as _export
from . import generate as _generate
from . import inspect as _inspect
from . import merge as _merge

app = typer.Typer(
    name="erasekit",
    help="Erase a concept from a Stable Diffusion model, shipped as a small, inspectable, revertible patch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"erasekit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Erase a concept from a Stable Diffusion model, shipped as a small, inspectable, revertible patch."""


app.command("erase")(_erase.erase_cmd)
app.command("generate")(_generate.generate_cmd)
app.command("eval")(_eval.eval_cmd)
app.command("inspect")(_inspect.inspect_cmd)
app.command("apply")(_apply.apply_cmd)
app.command("diff")(_diff.diff_cmd)
app.command("merge")(_merge.merge_cmd)
app.command("export")(_export.export_cmd)


def main() -> None:
    app()
