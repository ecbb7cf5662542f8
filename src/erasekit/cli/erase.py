"""``erasekit erase [--model MODEL] --concept NAME [--images DIR|auto] -o OUT.erasepatch``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ._common import (
    OPTION_FLAGS,
    ConfigOpt,
    JsonOpt,
    ModelOpt,
    PredictionOpt,
    TextEncodersOpt,
    VaeOpt,
    brief,
    err,
    errors,
    file_list,
    human_bytes,
    out,
    packed,
    print_json,
    progress_bar,
    warn,
)

# Options left unset take the model's recommended value (erasekit.json in the model folder), else the
# published recipe's; so their defaults here are None.
Num = Optional[float]


def erase_cmd(
    ctx: typer.Context,
    concept: Annotated[
        Optional[list[str]],
        typer.Option(
            "--concept",
            "-c",
            metavar="NAME",
            help="Concept to erase (repeat for several; one patch erases all).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "-o",
            "--output",
            metavar="OUT",
            help="Patch to write: "
            "NAME.safetensors for a file ComfyUI and A1111 list in their LoRA "
            "folders, or NAME.erasepatch.",
            show_default=False,
        ),
    ] = None,
    manifest: Annotated[
        Optional[Path],
        typer.Option(
            "--manifest",
            metavar="JOBS.toml",
            help="Run a batch of erases "
            "instead: a TOML file whose top-level keys are defaults for every "
            "[[jobs]] table (concept, output, any option). Jobs whose patch "
            "holds the same settings are skipped. Under accelerate launch "
            "the jobs are split between the processes. See docs/batch.md.",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = None,
    images: Annotated[
        Optional[list[str]],
        typer.Option(
            "--images",
            metavar="DIR|auto",
            help="Folder of images "
            "of the concept (one per --concept; any format Pillow "
            "reads, other files skipped with a warning), or 'auto' to "
            "render them with the model first. The built-in model draws "
            "them itself when omitted.",
        ),
    ] = None,
    num_images: Annotated[
        int,
        typer.Option("--num-images", metavar="N", help="Images per concept with --images auto or the built-in model."),
    ] = 4,
    kind: Annotated[Optional[str], typer.Option("--kind", help="Prompt templates: object or style.")] = None,
    template: Annotated[
        Optional[list[str]],
        typer.Option(
            "--template",
            metavar="TEXT",
            help="Prompt template with {} for the concept (repeatable; replaces --kind's).",
        ),
    ] = None,
    templates_file: Annotated[
        Optional[Path], typer.Option("--templates-file", metavar="FILE", help="A file of templates, one per line.")
    ] = None,
    concept_template: Annotated[
        Optional[list[str]],
        typer.Option(
            "--concept-template",
            metavar="CONCEPT=TEMPLATE",
            help="A template for one concept only, e.g. 'Van "
            "Gogh=a painting in the style of {}' next to an "
            "object (repeatable; that concept's list replaces "
            "the common one).",
        ),
    ] = None,
    recipe: Annotated[
        Optional[str],
        typer.Option(
            "--recipe",
            help="paper: the published recipe (ascent only). "
            "anchored: ascent while holding other prompts' conditioning in "
            "place, with an early stop. doco: a discriminator teaches the "
            "encoders to turn the concept's images into its stand-in's, other "
            "prompts held, with gradient surgery. [default: the model's, else "
            "paper]",
        ),
    ] = None,
    surgery: Annotated[
        Num,
        typer.Option(
            "--surgery",
            metavar="LAMBDA",
            help="Gradient surgery: remove this share "
            "(0-1) of the erasing gradient's conflict with holding the anchor and "
            "--keep prompts, per tensor, every step. [default: 1 for doco, else off]",
        ),
    ] = None,
    after: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--after",
            metavar="PATCH",
            help="A patch this one will be "
            "stacked on (repeatable, in the order they are applied): the "
            "erase runs with them applied and learns what is left; stack "
            "them in that order. Several concepts erased one after another "
            "so stay erased together.",
        ),
    ] = None,
    keep: Annotated[
        Optional[list[str]],
        typer.Option("--keep", metavar="NAME", help="A concept to protect (anchored and doco recipes; repeatable)."),
    ] = None,
    stand_in: Annotated[
        Optional[list[str]],
        typer.Option(
            "--stand-in",
            metavar="CONCEPT=WORD",
            help="What "
            "takes the concept's place (anchored and doco; "
            "repeatable): prompts naming it are held at the same "
            "prompt with WORD instead, so the rest of the prompt "
            "keeps its meaning. WORD may be empty (drop the word) "
            "or a comma-separated list (their mean).",
        ),
    ] = None,
    anchor_weight: Annotated[
        Num,
        typer.Option(
            "--anchor-weight", help="Weight of the anchor penalty (anchored recipe). [default: the model's, else 30]"
        ),
    ] = None,
    no_early_stop: Annotated[bool, typer.Option("--no-early-stop", help="Run every step (anchored recipe).")] = False,
    lr: Annotated[Num, typer.Option("--lr", help="Adam learning rate. [default: the model's, else 1e-5]")] = None,
    epochs: Annotated[
        Optional[int],
        typer.Option(
            "--epochs",
            help="Passes over the images (replaces a model's recommended --steps). [default: the model's, else 5]",
        ),
    ] = None,
    steps: Annotated[
        Optional[int],
        typer.Option(
            "--steps", help="Optimizer steps (overrides --epochs). [default: the model's, else from --epochs]"
        ),
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", help="Images per step. [default: the model's, else 2]")
    ] = None,
    flip: Annotated[
        Optional[bool],
        typer.Option(
            "--flip/--no-flip",
            help="Flip each image horizontally with probability 0.5, decided once. [default: the model's, else on]",
            show_default=False,
        ),
    ] = None,
    draws: Annotated[
        Optional[int], typer.Option("--draws", help="Noise draws per image per step. [default: 1]")
    ] = None,
    resolution: Annotated[
        Optional[int],
        typer.Option(
            "--resolution",
            help="Training image size in pixels. "
            "[default: the model's erasekit.json, else its native size "
            "(denoiser sample size x VAE scale: SD1 512, SD2 768-v 768, SDXL "
            "1024, FLUX.1 and SD3.x 1024)]",
        ),
    ] = None,
    layers: Annotated[
        Optional[str], typer.Option("--layers", metavar="0-11", help="Text-encoder layers to change (default: all).")
    ] = None,
    encoders: Annotated[
        Optional[str],
        typer.Option(
            "--encoders",
            metavar="te1,te2,te3",
            help="Which text encoders to change (default: every one the denoiser reads): SDXL te1, te2; "
            "FLUX.1 te1 (CLIP-L), te3 (T5); SD3.x te1, te2, te3.",
        ),
    ] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of every random choice. [default: 0]")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N. [default: auto]")] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option(
            "--dtype",
            help="Autocast dtype of the frozen UNet, and the dtype the frozen "
            "text encoders are held in where low-rank factors train (T5 "
            "erases): auto (bf16 where the device computes it natively: "
            "GPUs, CPUs with AVX512-BF16/AMX; else fp32), fp32, bf16 (fp16 "
            "is refused: its gradients underflow without loss scaling).",
        ),
    ] = None,
    rank: Annotated[
        Optional[str],
        typer.Option(
            "--rank",
            metavar="auto|N|dense",
            help="How to store each weight "
            "delta: auto (low-rank factors, per tensor the smallest rank up to "
            "--max-rank whose effect on the erase's prompts is within "
            "--rank-tol of the trained delta's), N (rank N), dense (the whole "
            "delta; 113 MB for SD1.x). [default: auto]",
        ),
    ] = None,
    rank_tol: Annotated[
        Optional[float],
        typer.Option("--rank-tol", help="--rank auto: the relative error allowed per tensor. [default: 0.05]"),
    ] = None,
    max_rank: Annotated[
        Optional[int],
        typer.Option(
            "--max-rank",
            help="--rank auto: the largest rank of a tensor "
            "(32 keeps SD1.x patches under 7 MB and SDXL ones under 33 MB). "
            "[default: 32]",
        ),
    ] = None,
    patch_dtype: Annotated[
        Optional[str],
        typer.Option("--patch-dtype", help="Storage dtype of the deltas: F32, F16, BF16. [default: BF16]"),
    ] = None,
    config_dir: ConfigOpt = None,
    prediction_type: PredictionOpt = None,
    text_encoders: TextEncodersOpt = None,
    vae: VaeOpt = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the latents cache.")] = False,
    forget_check: Annotated[
        bool,
        typer.Option(
            "--forget-check",
            help="Also measure the denoising loss on fixed draws before and after the erase (8 more UNet passes).",
        ),
    ] = False,
    checkpointing: Annotated[
        bool,
        typer.Option("--checkpointing", help="Gradient checkpointing of the frozen UNet: less memory for more time."),
    ] = False,
    offload: Annotated[
        Optional[str],
        typer.Option(
            "--offload",
            metavar="none|blocks",
            help="Where the frozen denoiser is held: none (on the device, whole), blocks (FLUX.1, SD3.x: the "
            "transformer's blocks in CPU memory, each moved to the GPU for its forward pass and again for its "
            "backward pass; for a GPU the model does not fit, such as 24 GB for FLUX.1-dev). [default: none]",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Erase concepts from a model's text encoder by few-shot unlearning; write the change as a patch."""
    if manifest is not None:
        on_command_line = [
            name
            for name in ctx.params
            if name not in ("manifest", "as_json")  # typer may bundle its own click
            and getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"
        ]
        return _erase_batch(manifest, on_command_line, as_json)
    from ..erasing.erase_job import erase_model
    from ..format.erase_config import parse_concept_templates, parse_layers, parse_stand_ins, read_templates_file

    with errors():
        if not concept or output is None:
            from ..errors import ErasekitError

            raise ErasekitError(
                "erase needs --concept and -o (or a batch of jobs: --manifest)",
                "name a concept and the patch to write",
                option="concepts" if not concept else "output",
            )
        tmpl = list(template or []) + (read_templates_file(templates_file) if templates_file is not None else [])
        stand_ins = parse_stand_ins(stand_in or [])
        given: dict[str, Any] = {
            "kind": kind,
            "templates": tmpl or None,
            "concept_templates": parse_concept_templates(concept_template or []) or None,
            "recipe": recipe,
            "surgery": surgery,
            "keep": keep,
            "stand_ins": stand_ins or None,
            "anchor_weight": anchor_weight,
            "lr": lr,
            "epochs": epochs,
            "steps": steps,
            "batch_size": batch_size,
            "draws": draws,
            "resolution": resolution,
            "rank": rank,
            "rank_tol": rank_tol,
            "max_rank": max_rank,
            "layers": parse_layers(layers) if layers else None,
            "encoders": [e.strip() for e in encoders.split(",")] if encoders else None,
            "seed": seed,
            "device": device,
            "flip": flip,
            "dtype": dtype,
            "patch_dtype": patch_dtype.upper() if patch_dtype else None,
            "offload": offload,
        }
        overrides = {k: v for k, v in given.items() if v is not None}
        if no_early_stop:
            overrides["stop_ratio"] = None
        if no_cache:
            overrides["cache"] = False
        overrides |= {k: True for k, on in (("forget_check", forget_check), ("checkpointing", checkpointing)) if on}
        src = None if images is None else "auto" if images == ["auto"] else images
        with progress_bar("erasing", enabled=not as_json) as update:
            report = erase_model(
                model,
                concept,
                src,
                output,
                overrides,
                num_images=num_images,
                config_dir=config_dir,
                prediction_type=prediction_type,
                text_encoders=file_list(text_encoders),
                vae=vae,
                after=after or (),
                progress=lambda s: update(
                    s.step, s.total, f"loss {s.loss:.4f}  {s.step / max(s.seconds, 1e-9):.1f} it/s"
                ),
            )
    if as_json:
        print_json({k: v for k, v in report.__dict__.items() if k != "patch"})
        return
    stopped = (
        " (stopped early: the erasure tipped)"
        if report.patch.manifest.method.hyperparameters.get("stopped_early")
        else ""
    )
    out.print(f"Erased {', '.join(report.concepts)} -> {report.output} ({human_bytes(report.patch_bytes)})")
    out.print(
        f"  {report.steps} steps{stopped} on {report.num_images} images, {report.device}: "
        f"{report.loop_seconds:.2f} s in the loop, {report.total_seconds:.2f} s in total"
    )
    out.print(
        f"  denoising loss {report.loss_start:.4f} -> {report.loss_end:.4f} (first and last steps)"
        + (
            f"; on fixed draws {report.forget_loss_before:.4f} -> {report.forget_loss_after:.4f}"
            if report.forget_loss_before is not None
            else ""
        )
    )
    out.print("  time: " + ", ".join(f"{phase} {s:.2f} s" for phase, s in report.timings.items()))
    if report.streamed_bytes:
        out.print(f"  the transformer's blocks streamed from CPU memory: {human_bytes(report.streamed_bytes)} moved")
    if report.rank_kept is not None:
        ranks = [d.rank for d in report.patch.manifest.deltas.values() if d.rank]
        out.print(
            f"  stored low-rank (ranks {min(ranks)}-{max(ranks)}): the text encoders' outputs within "
            f"{_per_output(report.output_errors)} of the trained change's, {100 * report.rank_kept:.1f}% of its "
            "squared norm kept"
        )
    out.print(f"  the empty prompt (guidance's unconditional branch) moved {_per_output(report.empty_prompt_drift)}")
    hp = report.patch.manifest.method.hyperparameters
    if hp.get("surgery"):
        out.print(
            f"  gradient surgery (lambda {hp['surgery']}): {100 * hp['surgery_conflicts']:.0f}% of the tensors' "
            "erasing gradients conflicted with holding the other prompts and were projected"
        )
    out.print(
        "  changed most: "
        + ", ".join(
            f"{m.removeprefix('lora_').replace('_text_model_encoder_', ' ')} ({n:.3g})" for m, n in report.top_layers
        )
    )
    for line in _settings_lines(report.sources, hp):
        out.print(line)
    for line in report.ui:
        out.print(f"  {line}")


SOURCE_LABELS = {"user": "you gave", "model": "the model recommends", "native": "for the model's native size"}


def _settings_lines(sources: dict[str, str], hp: dict[str, Any]) -> list[str]:
    """The recorded settings that did not come from the defaults, lists counted, a few short lines per source: what
    the user gave, what the model recommends (its erasekit.json), the model's native size, any other source."""
    if not sources:
        return []
    groups: dict[str, list[str]] = {source: [] for source in SOURCE_LABELS}
    for name, source in sorted(sources.items()):
        if name in hp:
            source, _, note = source.partition("; ")  # "model; native 1024": the model's size, not the native one
            groups.setdefault(source, []).append(brief(name, hp[name]) + (f" ({note})" if note else ""))
    lines = [
        line
        for source, items in groups.items()
        if items
        for line in packed(f"  settings {SOURCE_LABELS.get(source, f'from {source}')}: ", items, indent=4)
    ]
    return lines + ["  other settings: defaults (erasekit erase --help)"]


def _per_output(values: dict[str, float]) -> str:
    """``{"hidden": 0.012, "pooled": 0.3}`` -> "1.2% (hidden states), 30.0% (pooled embedding)"."""
    names = {"hidden": "hidden states", "pooled": "pooled embedding"}
    return ", ".join(f"{100 * v:.1f}% ({names.get(k, k)})" for k, v in values.items())


def _erase_batch(manifest: Path, given: list[str], as_json: bool) -> None:
    """``erase --manifest``: run the batch, print a line per finished job (stderr) and the summary."""
    import os

    from ..erasing.batch import run_batch
    from ..errors import ErasekitError

    quiet = os.environ.get("RANK", "0") != "0"  # under accelerate, the main process alone reports
    with errors():
        if given:
            flag = OPTION_FLAGS.get(given[0], "--" + given[0].replace("_", "-"))
            raise ErasekitError(
                f"{flag} cannot be given with --manifest",
                "set it in the manifest (top level for every job, or in a [[jobs]] table)",
                option="manifest",
            )
        try:
            report = run_batch(
                manifest, on_plan=None if as_json or quiet else _plan_lines, on_job=None if as_json else _job_line
            )
        except ErasekitError as e:
            if quiet:  # every process refuses the same manifest; one line is enough
                raise typer.Exit(e.exit_code) from None
            raise
    if quiet:
        raise typer.Exit(1 if report.counts["failed"] else 0)
    warn(report.notes)
    if as_json:
        print_json(report)
    else:
        _summary(report)
    if report.counts["failed"]:
        print(
            f"error: {report.counts['failed']} of {len(report.jobs)} jobs failed (see the summary); the others ran; "
            "fix them and rerun the manifest: finished jobs are skipped",
            file=sys.stderr,
        )
        raise typer.Exit(1)


def _plan_lines(planned: list[Any]) -> None:
    """Where every job writes, before any runs: the absolute path, flagged when outside the manifest's folder."""
    from ..errors import one_line

    print(f"{len(planned)} jobs write:", file=sys.stderr)
    for p in planned:
        outside = "  (outside the manifest's folder)" if p.outside else ""
        print(
            f"  jobs[{p.index}] {one_line(', '.join(p.job.concepts))} -> {one_line(p.path)}{outside}", file=sys.stderr
        )


def _job_line(r: Any) -> None:
    what = {"done": f"done in {r.loop_seconds or 0:.1f} s", "failed": f"failed: {r.error}"}.get(r.status, r.status)
    err.print(f"[process {r.process}] jobs[{r.index}] {r.output}: {what}")


def _summary(report: Any) -> None:
    from rich.table import Table

    table = Table(
        title=f"{report.manifest}: {len(report.jobs)} jobs on {report.processes} "
        f"process{'es' if report.processes > 1 else ''}, {report.total_seconds:.1f} s",
        title_justify="left",
    )
    for name, justify in (
        ("#", "right"),
        ("output", "left"),
        ("concepts", "left"),
        ("status", "left"),
        ("loop s", "right"),
        ("loss", "right"),
        ("size", "right"),
        ("note / error", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for j in report.jobs:
        loss = f"{j.loss_start:.4f} -> {j.loss_end:.4f}" if j.loss_end is not None else ""
        table.add_row(
            str(j.index),
            j.output,
            ", ".join(j.concepts),
            j.status,
            f"{j.loop_seconds:.2f}" if j.loop_seconds is not None else "",
            loss,
            human_bytes(j.patch_bytes) if j.patch_bytes else "",
            j.error or j.note or "",
        )
    out.print(table)
    out.print(", ".join(f"{n} {status}" for status, n in report.counts.items()))
