"""``erasekit export PATCH --ui comfyui|a1111 -o NAME.safetensors``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import JsonOpt, errors, human_bytes, out, print_json, warn


def export_cmd(
    patch: Annotated[Path, typer.Argument(metavar="PATCH", help="An erasekit patch.", show_default=False)],
    ui: Annotated[str, typer.Option("--ui", help="comfyui or a1111.", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", metavar="NAME.safetensors", help="File to write; put it "
                                         "in the UI's LoRA folder.", show_default=False)],
    as_json: JsonOpt = False,
) -> None:
    """Write a patch as a file one UI loads with every tensor matched (SDXL refiner patches; low-rank patches for A1111)."""
    from ..ui_export import export_patch

    with errors():
        report = export_patch(patch, ui.lower(), output)
    if as_json:
        print_json(report)
        return
    warn(report.notes)
    out.print(f"Exported {report.source} for {ui} -> {report.output} ({human_bytes(report.bytes)}, "
              f"{report.modules} modules)")
