"""``erasekit eval [--model M] --patch P [--patch ...] --concept C [-n N] [--seed S] [--grid out.png]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._common import ConfigOpt, PredictionOpt, DeviceOpt, JsonOpt, ModelOpt, errors, make_config, out, print_json, progress_bar


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:5.1f}%"


def eval_cmd(
    patch: Annotated[list[Path], typer.Option("--patch", "-p", metavar="PATCH", help="Patch to evaluate "
                                              "(repeatable: all are applied).", show_default=False)],
    concept: Annotated[str, typer.Option("--concept", "-c", metavar="NAME", help="The erased concept (a shape, "
                                         "colour or pattern the judge knows).", show_default=False)],
    model: ModelOpt = None,
    n: Annotated[int, typer.Option("-n", help="Images per prompt.")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="First seed (held out from training).")] = 1000,
    steps: Annotated[int, typer.Option("--steps", help="Sampling steps.")] = 25,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")] = 7.5,
    strength: Annotated[float, typer.Option("--strength", help="Scale of the patches.")] = 1.0,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", metavar="FILE", help="Prompts to use instead "
                                                    "of the built-in set, one per line.")] = None,
    grid: Annotated[Optional[Path], typer.Option("--grid", metavar="OUT.png", help="Write the labelled "
                                                 "before/after picture.")] = None,
    device: DeviceOpt = "auto",
    config_dir: ConfigOpt = None,
    prediction_type: PredictionOpt = None,
    record: Annotated[bool, typer.Option("--record", help="Write this evaluation into the patch's manifest, where "
                                         "`erasekit inspect` shows it (one --patch only; the patch id stays; the "
                                         "same settings again replace the earlier record).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Judge a patch on the built-in toy world: target rate, every other concept, other attributes."""
    from ..evaluate import EvalConfig, evaluate_model

    if record:  # the same evaluation, then written into the patch
        from ..evidence import evaluate_and_record as evaluate_model  # type: ignore[assignment]

    with errors():
        config = make_config(EvalConfig, "eval", n=n, seed=seed, steps=steps, guidance=guidance, strength=strength,
                             device=device)
        with progress_bar("rendering", enabled=not as_json) as update:
            r = evaluate_model(concept, patch, model=model, config=config, prompts_file=prompts, grid=grid,
                               config_dir=config_dir, prediction_type=prediction_type, progress=lambda done, total: update(done, total, ""))
    if as_json:
        print_json(r)
        return
    out.print(f"Erasing '{r.concept}' ({r.attribute}) with {', '.join(r.patches)}: {r.images_per_prompt} images per "
              f"prompt, seeds {r.seeds[0]}-{r.seeds[-1]}, {r.seconds:.0f} s")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("", "before", "after", "change"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row(f"target: {r.target.concept} rate", _pct(r.target.before), _pct(r.target.after),
                  f"{r.target.change_pp:+.1f} pp")
    for o in r.others:
        table.add_row(f"{o.concept} accuracy", _pct(o.before), _pct(o.after), f"{o.change_pp:+.1f} pp")
    for name, a in r.attributes.items():
        table.add_row(f"{name} accuracy (all images)", _pct(a.before), _pct(a.after), f"{a.change_pp:+.1f} pp")
        e = r.attributes_elsewhere[name]
        table.add_row(f"{name} accuracy (other {r.attribute}s' images)", _pct(e.before), _pct(e.after),
                      f"{e.change_pp:+.1f} pp")
    out.print(table)
    drop = f"{r.largest_drop.concept} {r.largest_drop.change_pp:+.1f} pp" if r.largest_drop else "none"
    out.print(f"largest drop among other {r.attribute}s: {drop}")
    if r.grid:
        out.print(f"grid: {r.grid}")
    if getattr(r, "recorded", None):
        rec = r.recorded
        how = "replacing the earlier record of the same settings" if rec.replaced else "added"
        out.print(f"recorded in {rec.path} ({how}; {rec.evaluations} recorded; patch id {rec.patch_id[:16]} "
                  "unchanged)")
