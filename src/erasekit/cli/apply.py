"""``erasekit apply PATCH... --to CKPT (-o OUT | --in-place)`` and ``erasekit apply --revert PATCH --to CKPT``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import ForceOpt, JsonOpt, errors, human_bytes, out, print_json, warn


def apply_cmd(
    patches: Annotated[
        list[Path],
        typer.Argument(help="One or more .erasepatch files, applied in order.", metavar="PATCH", show_default=False),
    ],
    to: Annotated[
        Path,
        typer.Option(
            "--to",
            metavar="CKPT",
            help="The checkpoint: diffusers folder, CLIPTextModel or T5EncoderModel folder, .safetensors or .ckpt "
            "file.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Optional[Path],
        typer.Option(
            "-o", "--output", metavar="OUT", help="Write the result here (new file or folder, written atomically)."
        ),
    ] = None,
    in_place: Annotated[
        bool,
        typer.Option("--in-place", help="Rewrite only the touched tensors of the checkpoint, keeping an undo record."),
    ] = False,
    strength: Annotated[
        Optional[list[float]],
        typer.Option("--strength", metavar="S", help="Scale of each patch (once for all, or once per patch)."),
    ] = None,
    revert: Annotated[
        bool,
        typer.Option(
            "--revert", help="Restore the checkpoint's bytes from before PATCH was applied in place (bit-exact)."
        ),
    ] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Apply patches to a checkpoint, or revert one bit for bit."""
    from ..checkpoints.apply import apply_to_checkpoint, revert_from_checkpoint
    from ..errors import ErasekitError

    with errors():
        if revert:
            if len(patches) != 1 or output is not None or strength:
                raise ErasekitError(
                    "--revert takes exactly one patch and no -o or --strength",
                    "run: erasekit apply --revert PATCH --to CKPT",
                )
            reverted = revert_from_checkpoint(patches[0], to, force=force)
        else:
            if (output is None) == (not in_place):
                raise ErasekitError("say where the result goes", "pass either -o OUT or --in-place")
            s = strength or [1.0]
            report = apply_to_checkpoint(
                patches, to, output=output, in_place=in_place, strength=s[0] if len(s) == 1 else s, force=force
            )
    if as_json:
        print_json(reverted if revert else report)
        return
    if revert:
        left = ", ".join(reverted.remaining) or "none"
        out.print(
            f"Reverted '{reverted.title}' from {reverted.target} [{reverted.layout}]: {reverted.tensors} tensors "
            f"restored{', sha256 verified' if reverted.verified else ''}, in {reverted.seconds:.2f} s. "
            f"Still applied: {left}."
        )
        return
    warn(report.warnings)
    where = "in place" if report.in_place else f"-> {report.output}"
    for a in report.applied:
        note = f", {a.differing} tensors differed (--force)" if a.fingerprint == "forced" else ""
        out.print(
            f"Applied '{a.title}' at strength {a.strength:g}: {a.tensors} tensors, base fingerprint "
            f"{a.fingerprint}{note}"
        )
    out.print(
        f"{report.target} [{report.layout}] {where}: {human_bytes(report.bytes_written)} of tensors "
        f"rewritten in {report.seconds:.2f} s. Undo: erasekit apply --revert PATCH --to {report.output}"
    )
