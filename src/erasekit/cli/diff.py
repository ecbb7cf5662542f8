"""``erasekit diff A B [-o OUT.erasepatch] [--json]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import JsonOpt, bar, errors, human_bytes, norm_or_dash, out, print_json, warn


def diff_cmd(
    a: Annotated[Path, typer.Argument(metavar="A", help="A checkpoint or patch.", show_default=False)],
    b: Annotated[
        Path, typer.Argument(metavar="B", help="A checkpoint or patch of the same kind as A.", show_default=False)
    ],
    output: Annotated[
        Optional[Path],
        typer.Option(
            "-o",
            "--output",
            metavar="OUT",
            help="Extract B minus A as a patch "
            "(checkpoints only): NAME.safetensors for a file ComfyUI and A1111 "
            "list, or NAME.erasepatch.",
        ),
    ] = None,
    title: Annotated[
        Optional[str], typer.Option("--title", metavar="TEXT", help="Title of the extracted patch.")
    ] = None,
    rank: Annotated[
        Optional[int],
        typer.Option(
            "--rank",
            metavar="R",
            help="Store low-rank (SVD) deltas of this rank "
            "instead of dense ones; the table shows what each lost ('stored off': "
            "the relative Frobenius error).",
        ),
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", metavar="DTYPE", help="Storage dtype of the extracted deltas: F32, F16 or BF16.")
    ] = "F32",
    ffn_only: Annotated[
        bool,
        typer.Option(
            "--ffn-only",
            help="With -o: write the FFN part even though B also differs "
            "elsewhere in the text encoder (refused otherwise; the patch records what "
            "it leaves out).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Compare two checkpoints (per-layer FFN change) or two patches (cosine similarity, norm ratio)."""
    from ..checkpoints.diff import diff_paths

    with errors():
        report = diff_paths(a, b, output=output, title=title, rank=rank, dtype=dtype.upper(), ffn_only=ffn_only)
    if as_json:
        print_json(report)
        return
    warn(report.notes)
    table = Table(box=None, pad_edge=False, header_style="bold")
    if report.kind == "patches":
        for col in ("enc", "layer", "proj", "|A|", "|B|", "cosine", "|B|/|A|"):
            table.add_column(col, justify="left" if col in ("enc", "proj") else "right")
        for pair in report.comparisons:
            table.add_row(
                pair.encoder,
                str(pair.layer),
                pair.proj,
                f"{pair.norm_a:.3g}",
                f"{pair.norm_b:.3g}",
                "-" if pair.cosine is None else f"{pair.cosine:+.3f}",
                "-" if pair.norm_ratio is None else f"{pair.norm_ratio:.3g}",
            )
        out.print(f"Patches A={report.a}  B={report.b}  ({report.architecture})")
        out.print(table)
        return
    lossy = any(c.stored_error is not None for c in report.changes)
    for col in ("enc", "layer", "proj", "shape", "|ΔW|", "|ΔW|/|W|", "|Δb|", *(["stored off"] if lossy else []), ""):
        table.add_column(col, justify="left" if col in ("enc", "proj", "shape", "") else "right")
    top = max((c.delta_norm for c in report.changes), default=0.0)
    for c in report.changes:
        lost = ["-" if c.stored_error is None else f"{100 * c.stored_error:.1f}%"] if lossy else []
        table.add_row(
            c.encoder,
            str(c.layer),
            c.proj,
            "x".join(map(str, c.shape)),
            f"{c.delta_norm:.3g}",
            f"{c.relative:.2e}",
            norm_or_dash(c.bias_delta_norm),
            *lost,
            bar(c.delta_norm, top),
        )
    changed = sum(1 for c in report.changes if c.delta_norm or c.bias_delta_norm)
    out.print(
        f"Checkpoints A={report.a}  B={report.b}  ({report.architecture}): "
        f"{changed} of {len(report.changes)} FFN projections differ"
    )
    out.print(table)
    if report.output:
        out.print(f"Wrote {report.output} ({human_bytes(report.output_bytes)}) in {report.seconds:.2f} s")
        for line in report.ui:
            out.print(f"  {line}")
