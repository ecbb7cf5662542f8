"""``erasekit export PATCH --ui comfyui|a1111|diffusers -o NAME.safetensors``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import JsonOpt, errors, human_bytes, out, print_json, warn


def export_cmd(
    patch: Annotated[Path, typer.Argument(metavar="PATCH", help="An erasekit patch.", show_default=False)],
    ui: Annotated[str, typer.Option("--ui", help="comfyui, a1111 or diffusers.", show_default=False)],
    output: Annotated[
        Path,
        typer.Option(
            "-o",
            "--output",
            metavar="NAME.safetensors",
            help="File to write; put it in the UI's LoRA folder (diffusers: pipe.load_lora_weights(FILE)).",
            show_default=False,
        ),
    ],
    as_json: JsonOpt = False,
) -> None:
    """Write a patch as a file one UI loads with every tensor matched (SDXL refiner patches; low-rank patches for
    A1111; every patch for diffusers, whose load_lora_weights reads no patch as it is)."""
    from ..format.ui_export import export_patch

    with errors():
        report = export_patch(patch, ui.lower(), output)
    if as_json:
        print_json(report)
        return
    warn(report.notes)
    out.print(
        f"Exported {report.source} for {ui} -> {report.output} ({human_bytes(report.bytes)}, {report.modules} modules)"
    )
    if report.ui == "diffusers":
        out.print(f'  load it with pipe.load_lora_weights("{report.output}"); strength S: pipe.fuse_lora(lora_scale=S)')
