"""``erasekit eval [--model M] --patch P [--patch ...] --concept C [-n N] [--seed S] [--paraphrases FILE]
[--judge CLIP_FOLDER [--keep NAME ...] [--stand-in WORD ...]] [--grid out.png]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

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


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:5.1f}%"


def eval_cmd(
    patch: Annotated[
        list[Path],
        typer.Option(
            "--patch",
            "-p",
            metavar="PATCH",
            help="Patch to evaluate (repeatable: all are applied).",
            show_default=False,
        ),
    ],
    concept: Annotated[
        str,
        typer.Option(
            "--concept",
            "-c",
            metavar="NAME",
            help="The erased concept (with the built-in judge: a shape, colour or pattern of the toy world).",
            show_default=False,
        ),
    ],
    model: ModelOpt = None,
    n: Annotated[int, typer.Option("-n", help="Images per prompt (and per paraphrase).")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="First seed (held out from training).")] = 1000,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    strength: Annotated[float, typer.Option("--strength", help="Scale of the patches.")] = 1.0,
    prompts: Annotated[
        Optional[Path],
        typer.Option(
            "--prompts",
            metavar="FILE",
            help="Prompts to use instead of the built-in set, one per line (with --judge: each naming one label).",
        ),
    ] = None,
    paraphrases: Annotated[
        Optional[Path],
        typer.Option(
            "--paraphrases",
            metavar="FILE",
            help="Wordings of the "
            "concept to report as robustness, one per line: {} where "
            "the concept goes, or a whole prompt. [default: the "
            "built-in model's own; none for other models]",
        ),
    ] = None,
    judge: Annotated[
        Optional[Path],
        typer.Option(
            "--judge",
            metavar="CLIP_FOLDER",
            help="Judge with a local "
            "transformers CLIPModel folder (zero-shot among the concept, "
            "--keep and --stand-in) instead of the toy world's judge; "
            "needed for any other model.",
        ),
    ] = None,
    keep: Annotated[
        Optional[list[str]],
        typer.Option(
            "--keep",
            metavar="NAME",
            help="A neighbour whose accuracy "
            "to report (--judge; repeatable). [default: the patch's "
            "--keep; on the built-in model the other values of the "
            "concept's attribute]",
        ),
    ] = None,
    stand_in: Annotated[
        Optional[list[str]],
        typer.Option(
            "--stand-in",
            metavar="WORD",
            help="A stand-in to "
            "classify among (--judge; repeatable; CONCEPT=WORD as "
            "erase takes it also works). [default: the patch's]",
        ),
    ] = None,
    grid: Annotated[
        Optional[Path], typer.Option("--grid", metavar="OUT.png", help="Write the labelled before/after picture.")
    ] = None,
    device: DeviceOpt = "auto",
    config_dir: ConfigOpt = None,
    prediction_type: PredictionOpt = None,
    text_encoders: TextEncodersOpt = None,
    vae: VaeOpt = None,
    record: Annotated[
        bool,
        typer.Option(
            "--record",
            help="Write this evaluation into the patch's manifest, where "
            "`erasekit inspect` shows it (one --patch only; the patch id stays; the "
            "same settings again replace the earlier record).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Judge a patch before/after: target rate, every other concept, other attributes, paraphrases (built-in
    toy world, or any model with --judge CLIP_FOLDER)."""
    from ..judging.evaluate import EvalConfig, evaluate_model
    from ..judging.evidence import evaluate_and_record

    run = (
        evaluate_and_record if record else evaluate_model
    )  # --record: the same evaluation, then written into the patch

    with errors():
        config = make_config(
            EvalConfig, "eval", n=n, seed=seed, steps=steps, guidance=guidance, strength=strength, device=device
        )
        with progress_bar("rendering", enabled=not as_json) as update:
            r = run(
                concept,
                patch,
                model=model,
                config=config,
                prompts_file=prompts,
                paraphrases=paraphrases,
                judge=judge,
                keep=keep or (),
                stand_ins=stand_in or (),
                grid=grid,
                config_dir=config_dir,
                prediction_type=prediction_type,
                text_encoders=file_list(text_encoders),
                vae=vae,
                progress=lambda done, total: update(done, total, ""),
            )
    if as_json:
        print_json(r)
        return
    warn(r.notes)
    judged = "" if r.judge == "toyworld" else f", judged by CLIP ({r.judge}) among {', '.join(r.labels)}"
    out.print(
        f"Erasing '{r.concept}' ({r.attribute}) with {', '.join(r.patches)}{judged}: {r.images_per_prompt} "
        f"images per prompt, seeds {r.seeds[0]}-{r.seeds[-1]}, {r.settings}, {r.seconds:.0f} s"
    )
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("", "before", "after", "change"):
        table.add_column(col, justify="left" if not col else "right")

    def row(label: str, s: object) -> None:
        table.add_row(label, _pct(s.before), _pct(s.after), f"{s.change_pp:+.1f} pp")  # type: ignore[attr-defined]

    row(f"target: {r.target.concept} rate" + (" (see the note)" if r.judge_notes else ""), r.target)
    for o in r.others:
        row(f"{o.concept} accuracy", o)
    for name, a in r.attributes.items():
        row(f"{name} accuracy (all images)", a)
        row(f"{name} accuracy (other {r.attribute}s' images)", r.attributes_elsewhere[name])
    if r.robustness:
        rb = r.robustness
        row(f"paraphrases: {rb.concept} rate ({len(rb.wordings)} wordings)", rb)
        for w in rb.wordings:
            row(f"  '{w.concept}'", w)
    out.print(table)
    for note in r.judge_notes:
        out.print(f"note: {note}", soft_wrap=True)
    drop = f"{r.largest_drop.concept} {r.largest_drop.change_pp:+.1f} pp" if r.largest_drop else "none"
    out.print(f"largest drop among other {r.attribute}s: {drop}")
    if r.grid:
        out.print(f"grid: {r.grid}")
    rec = getattr(r, "recorded", None)  # evaluate_and_record's report (--record)
    if rec:
        how = "replacing the earlier record of the same settings" if rec.replaced else "added"
        out.print(f"recorded in {rec.path} ({how}; {rec.evaluations} recorded; patch id {rec.patch_id[:16]} unchanged)")
