"""``erasekit merge PATCH PATCH... -o OUT [--strength S]... [--rank N|dense] [--json]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import JsonOpt, errors, human_bytes, out, print_json, warn


def merge_cmd(
    patches: Annotated[
        list[Path],
        typer.Argument(
            help="Two or more patches made for the same base model, in the order they would be applied.",
            metavar="PATCH",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "-o",
            "--output",
            metavar="OUT",
            help="The merged patch (new file): NAME.erasepatch, or NAME.safetensors for a file ComfyUI and A1111 list.",
            show_default=False,
        ),
    ],
    strength: Annotated[
        Optional[list[float]],
        typer.Option(
            "--strength",
            metavar="S",
            help="Scale of each patch in the sum (once for all, or once per patch, in order).",
        ),
    ] = None,
    rank: Annotated[
        Optional[str],
        typer.Option(
            "--rank",
            metavar="N|dense",
            help="How to store the summed deltas: "
            "N (truncated SVD of each sum at rank N), dense (every module dense). "
            "Default: modules every input stores low-rank get the factors side by "
            "side (exact, rank = sum of ranks) while that is smaller than dense; "
            "the others are dense float32 sums.",
        ),
    ] = None,
    title: Annotated[
        Optional[str],
        typer.Option(
            "--title", metavar="TEXT", help="Title of the merged patch [default: the inputs' titles joined by ' + ']."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Merge patches for the same base model into one: deltas summed, concepts and base fingerprints merged."""
    from ..checkpoints.merge import merge_patches

    with errors():
        report = merge_patches(patches, output, strengths=strength, rank=rank.lower() if rank else None, title=title)
    if as_json:
        print_json(report)
        return
    warn(report.notes)
    for i in report.inputs:
        concepts = f" ({', '.join(i.concepts)})" if i.concepts else ""
        out.print(f"  {i.path}  '{i.title}'{concepts} at strength {i.strength:g}")
    table = Table(box=None, pad_edge=False, header_style="bold")
    projected = any(m.stored_error is not None for m in report.modules)
    for col in ("enc", "layer", "proj", "from", "storage", "how", *(["stored off"] if projected else [])):
        table.add_column(col, justify="right" if col in ("layer", "from", "stored off") else "left")
    for m in report.modules:
        lost = ["-" if m.stored_error is None else f"{100 * m.stored_error:.1f}%"] if projected else []
        table.add_row(m.encoder, str(m.layer), m.proj, str(m.sources), m.storage, m.how, *lost)
    out.print(table)
    concepts = ", ".join(report.concepts) or "none recorded"
    out.print(
        f"Wrote {report.output} ({human_bytes(report.output_bytes)}, {report.dtype}, {len(report.modules)} "
        f"modules, concepts: {concepts}) in {report.seconds:.2f} s"
    )
    for line in report.ui:
        out.print(f"  {line}")
