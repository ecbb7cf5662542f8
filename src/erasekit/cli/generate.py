"""``erasekit generate --model MODEL [--patch P ...] "prompt" ... -o outdir/``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    ConfigOpt,
    DeviceOpt,
    GuidanceOpt,
    JsonOpt,
    ModelOpt,
    PredictionOpt,
    StepsOpt,
    TextEncodersOpt,
    VaeOpt,
    errors,
    file_list,
    make_config,
    out,
    print_json,
    progress_bar,
    warn,
)


def generate_cmd(
    prompts: Annotated[list[str], typer.Argument(metavar="PROMPT", help="One or more prompts.", show_default=False)],
    model: ModelOpt = None,
    output: Annotated[
        Path, typer.Option("-o", "--output", metavar="DIR", help="Folder for the PNGs and grid.png.")
    ] = Path("erasekit-out"),
    patch: Annotated[
        Optional[list[Path]],
        typer.Option("--patch", "-p", metavar="PATCH", help="Patch to apply in memory (repeatable)."),
    ] = None,
    strength: Annotated[float, typer.Option("--strength", help="Scale of the patches.")] = 1.0,
    n: Annotated[int, typer.Option("-n", help="Images (seeds) per prompt.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="First seed; image i uses seed + i.")] = 0,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    resolution: Annotated[
        Optional[int], typer.Option("--resolution", help="Image size (default: the model's).")
    ] = None,
    compare: Annotated[
        bool,
        typer.Option("--compare", help="Render each prompt without and with the patches, same seeds, side by side."),
    ] = False,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            help="Seeds of a prompt rendered in one pipeline call "
            "(for GPUs; each seed keeps its own noise, so the images are the "
            "same).",
        ),
    ] = 1,
    device: DeviceOpt = "auto",
    config_dir: ConfigOpt = None,
    prediction_type: PredictionOpt = None,
    text_encoders: TextEncodersOpt = None,
    vae: VaeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Render prompts, optionally with patches applied (and without, with --compare)."""
    from ..judging.sampling import GenerateConfig, generate_model

    with errors():
        config = make_config(
            GenerateConfig,
            "generate",
            n=n,
            seed=seed,
            steps=steps,
            guidance=guidance,
            resolution=resolution,
            strength=strength,
            compare=compare,
            device=device,
            batch_size=batch_size,
        )
        with progress_bar("rendering", enabled=not as_json) as update:
            report = generate_model(
                model,
                prompts,
                output,
                config,
                patches=patch or [],
                config_dir=config_dir,
                prediction_type=prediction_type,
                text_encoders=file_list(text_encoders),
                vae=vae,
                progress=lambda done, total: update(done, total, ""),
            )
    if as_json:
        print_json(report)
        return
    warn(report.notes)
    out.print(f"Wrote {len(report.images)} images and {report.grid} in {report.seconds:.1f} s: {report.settings}")
