"""``erasekit inspect FILE [--against CKPT] [--full] [--json]``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from ._common import JsonOpt, bar, brief, errors, human_bytes, norm_or_dash, out, packed, print_json, ranges, warn

if TYPE_CHECKING:  # the CLI imports the library when a command runs
    from ..checkpoints.inspect import CheckpointInspection, EvaluationSummary, PatchInspection


def inspect_cmd(
    path: Annotated[
        Path,
        typer.Argument(metavar="FILE", help="A .erasepatch, or a checkpoint (folder or file).", show_default=False),
    ],
    against: Annotated[
        Optional[Path],
        typer.Option(
            "--against",
            metavar="CKPT",
            help="Checkpoint to compare a patch with: compatibility and relative change per layer.",
        ),
    ] = None,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="A patch's whole method record: every setting and list "
            "(without it, lists are counted and the settings that differ from the "
            "defaults come first).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Describe a patch (manifest, per-layer deltas) or a checkpoint (layout, encoders, applied patches)."""
    from ..checkpoints.inspect import PatchInspection, inspect_path

    with errors():
        result = inspect_path(path, against)
    if as_json:
        print_json(result)
        return
    if isinstance(result, PatchInspection):
        _render_patch(result, full)
    else:
        _render_checkpoint(result)


def _setting(name: str, value: object) -> object:
    """A manifest setting as the method line shows it: a merge's inputs, or the patches an erase was made after,
    by title and short id (and strength)."""
    if name in ("patches", "after") and isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return (
            "["
            + ", ".join(
                f"{p.get('title')} ({str(p.get('patch_id'))[:12]})" + (f" x{p['strength']}" if "strength" in p else "")
                for p in value
            )
            + "]"
        )
    return value


def _render_method(r: PatchInspection, full: bool) -> None:
    """The method: its whole record on one line (``--full``), else grouped, lists counted: the settings that differ
    from the defaults, the names of those at them, the rest of the record."""
    if full:
        record = r.method.get("hyperparameters", {})
        hp = " ".join(f"{k}={_setting(k, v)}" for k, v in record.items() if k != "left_out")
        seed = f" seed={r.method['seed']}" if r.method.get("seed") is not None else ""
        out.print(f"  method     {r.method['name']} {hp}{seed}".rstrip())
        return
    out.print(f"  method     {r.method['name']}")
    erase = bool(r.settings.changed or r.settings.default)
    groups = (
        ("settings", [brief(k, v) for k, v in r.settings.changed.items()]),
        ("defaults", list(r.settings.default)),  # by name: erasekit erase --help has their values
        ("recorded" if erase else "settings", [brief(k, _setting(k, v)) for k, v in r.settings.other.items()]),
    )
    for label, items in groups:
        for line in packed(f"  {label:<11}", items) if items else []:
            out.print(line)


def _render_patch(r: PatchInspection, full: bool = False) -> None:
    warn(r.warnings)
    out.print(
        f"Patch {r.path}  ({human_bytes(r.size_bytes)}, format v{r.format_version}, "
        f"written by erasekit {r.erasekit_version}, {r.created_at})"
    )
    out.print(f"  title      {r.title}")
    if r.concepts:
        out.print("  concepts   " + ", ".join(f"{c['name']} ({c['kind']})" for c in r.concepts))
    _render_method(r, full)
    encs = ", ".join(f"{s} ({e['hidden']}x{e['intermediate']}, {e['layers']} layers)" for s, e in r.encoders.items())
    left = r.method.get("hyperparameters", {}).get("left_out")
    if isinstance(left, dict):
        out.print(
            f"  left out   {left.get('tensors')} non-FFN tensors of the edit (largest: {left.get('largest')}, "
            f"relative change {left.get('largest_relative', 0):.2e})",
            style="bold yellow",
        )
    out.print(f"  base       {r.architecture}: {encs}")
    if r.base_config:
        out.print(f"  configs    {r.base_config}")
    for slot, e in r.encoders.items():
        layers = [row.layer for row in r.rows if row.encoder == slot]
        out.print(f"  changed    {slot}: layers {ranges(layers)} of 0-{e['layers'] - 1}")
    out.print(f"  patch id   {r.patch_id[:16]}")
    if r.against:
        out.print(f"  against    {r.against} [{r.against_layout}]: {r.compatibility}")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col, justify in (
        ("enc", "left"),
        ("layer", "right"),
        ("proj", "left"),
        ("shape", "left"),
        ("storage", "left"),
        ("dtype", "left"),
        ("|ΔW|", "right"),
        ("|Δb|", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    lossy = any(row.error is not None for row in r.rows)
    if lossy:  # what the low-rank factors lost: error against the trained change, share of its norm kept
        table.add_column("off", justify="right")
        table.add_column("kept", justify="right")
    if r.against:
        table.add_column("|ΔW|/|W|", justify="right")
    table.add_column("")
    top = max((row.delta_norm for row in r.rows), default=0.0)
    for row in r.rows:
        cells = [
            row.encoder,
            str(row.layer),
            row.proj,
            "x".join(map(str, row.shape)),
            row.storage,
            row.dtype,
            f"{row.delta_norm:.3g}",
            norm_or_dash(row.bias_delta_norm),
        ]
        if lossy:
            cells += ["-", "-"] if row.error is None else [f"{100 * row.error:.1f}%", f"{100 * (row.kept or 0):.1f}%"]
        if r.against:
            cells.append("-" if row.relative is None else f"{row.relative:.2e}")
        table.add_row(*cells, bar(row.delta_norm, top))
    out.print(table)
    if r.evaluations:
        _render_evaluations(r.evaluations)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}".rstrip("0").rstrip(".") + "%"


def _render_evaluations(evals: list[EvaluationSummary]) -> None:
    """The recorded evaluations (erasekit eval --record), one line each."""
    out.print(f"  evaluations recorded ({len(evals)}, oldest first)")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("recorded", "judge", "model", "n", "strength", "target", "largest neighbour drop", "paraphrases"):
        table.add_column(col, justify="right" if col in ("n", "strength") else "left")
    stale = False
    for e in evals:
        when = (e.recorded_at or "?")[:16].replace("T", " ")
        if e.concept is None:
            table.add_row(when, f"(evaluation format v{e.version}: shown by a newer erasekit)", *[""] * 6)
            continue
        stale |= not e.current
        drop = f"{e.largest_drop} {_pct(e.drop_before)} -> {_pct(e.drop_after)}" if e.largest_drop else "none"
        para = (
            "-"
            if e.paraphrase_before is None and e.paraphrase_after is None
            else f"{_pct(e.paraphrase_before)} -> {_pct(e.paraphrase_after)}"
        )
        table.add_row(
            when,
            e.judge,
            f"{e.model}{'' if e.current else ' *'}",
            str(e.images_per_prompt),
            f"{e.strength:g}",
            f"{e.concept} {_pct(e.target_before)} -> {_pct(e.target_after)}",
            drop,
            para,
        )
    out.print(table)
    if stale:
        out.print(
            "  * measured on other tensors than this patch's (another patch id): it does not describe this patch",
            style="bold yellow",
        )


def _render_checkpoint(r: CheckpointInspection) -> None:
    out.print(f"Checkpoint {r.path}")
    out.print(f"  layout        {r.layout}")
    out.print(f"  architecture  {r.architecture}")
    if r.config:
        out.print(f"  configs       {r.config}")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("encoder", "file", "naming", "key prefix", "width", "ffn", "layers", "dtype"):
        table.add_column(col)
    for e in r.encoders:
        table.add_row(
            e.slot, e.file, e.style, e.prefix or "(none)", str(e.hidden), str(e.intermediate), str(e.layers), e.dtype
        )
    out.print(table)
    if r.interrupted:
        out.print(
            f"  interrupted: {len(r.interrupted)} apply/revert did not finish; the next "
            "`erasekit apply` or `apply --revert` on this checkpoint rolls it back",
            style="bold yellow",
        )
    if not r.applied:
        out.print("  erasekit patches applied: none")
        return
    out.print(f"  erasekit patches applied ({len(r.applied)}, oldest first):")
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("#", "title", "strength", "fingerprint", "tensors", "applied at", "patch id"):
        t.add_column(col)
    for a in r.applied:
        t.add_row(
            a["id"],
            a["title"],
            f"{a['strength']:g}",
            a["fingerprint"],
            f"{a['tensors']} ({a['changed']} changed since)" if a.get("changed") else str(a["tensors"]),
            a["applied_at"],
            a["patch_id"][:16],
        )
    out.print(t)
