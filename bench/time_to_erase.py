"""Time to erase, not time per step (issue 10, target 5): on the built-in toy-world model, how long each recipe's
erase takes to erase the target without touching its neighbours.

    python bench/time_to_erase.py                  # every recipe x circle, red, striped x seeds 0,1,2; n=8
    python bench/time_to_erase.py --quick          # one concept, one seed, n=2: checks the script runs

For each (recipe, concept, seed) it runs `erase_model` with `steps=k` for k on an ascending grid, and judges each
patch with `evaluate_model` on the held-out eval seeds (EvalConfig's default seed 1000 on), as
bench/toy_erase_study.py does. The bar: target rate <= 5%, and neither any other concept of the same attribute nor
the other two attributes' accuracy more than 2 pp below the unmodified model's. The scan stops at the first k
that passes, then bisects `--refine` times between it and the last failing k (or 0). The time to erase is that
run's own time: EraseReport.loop_seconds (the optimizer loop) and total_seconds (erase_model end to end: load,
training images, loop, patch written), each the best of `--repeats` runs of the same erase (the machine is
shared; each repeat must reproduce the losses). Torch runs on `--threads` threads (default 1). A recipe that
never passes is reported as not reached within the grid's largest k, with the lowest target rate it reached.

A run with steps=k is the first k steps of any longer run (erasekit draws each epoch's shuffle when the epoch
begins), so the smallest passing k is the time until one long run first meets the bar, at the grid's resolution.
The script compares the losses of consecutive grid runs and prints how many were a prefix of the next (all of
them, unless that property breaks).

Markdown table at the end: medians across the seeds that reached the bar, and the ratio of each recipe's time to
the reference recipe's (`--reference`), per (concept, seed) where both reached it, median over those.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erasekit.checkpoints.pipeline import model_settings
from erasekit.erasing.erase_job import erase_model
from erasekit.judging.evaluate import EvalConfig, evaluate_model
from erasekit.toyworld import builtin_model_path

# name -> settings laid over the model's erasekit.json; the grid's `steps` is added to each (it replaces epochs)
RECIPES: dict[str, dict[str, Any]] = {
    # the published recipe as published (5 epochs = 10 steps on the built-in model: 4 images, batch 2)
    "paper": {"recipe": "paper", "lr": 1e-5, "epochs": 5},
    # the published loop at a learning rate that erases something
    "paper-strong": {"recipe": "paper", "lr": 1e-3},
    # the built-in model's defaults (erasekit.json): the anchored recipe with stand-ins
    "default": {},
    # DoCo on the text encoders, with the model's recommendations for it (erasekit.json's erase_recipes)
    "doco": {"recipe": "doco"},
}


@dataclass
class Trial:
    """One erase with steps=k and its eval."""

    steps: int
    loop_s: float
    total_s: float
    losses: list[float]
    target: float  # target rate after the erase
    ok: bool
    why: str  # what failed the bar, or "PASS"
    eval_s: float


@dataclass
class Outcome:
    """One (recipe, concept, seed): the trials run, and the smallest k that passed with its best timings."""

    trials: dict[int, Trial] = field(default_factory=dict)
    passed: Trial | None = None
    loop_s: float = float("nan")
    total_s: float = float("nan")
    reproduced: bool = True

    def best_target(self) -> Trial:
        return min(self.trials.values(), key=lambda t: (t.target, t.steps))


def judge(ev: Any) -> tuple[bool, str]:
    """The bar of bench/toy_erase_study.py, without its time limit."""
    fails = []
    if ev.target.after > 0.05:
        fails.append(f"target {100 * ev.target.after:.1f}%")
    if ev.largest_drop is not None and ev.largest_drop.change_pp < -2:
        fails.append(f"{ev.largest_drop.concept} {ev.largest_drop.change_pp:+.1f} pp")
    fails += [f"{a.concept} {a.change_pp:+.1f} pp" for a in ev.attributes.values() if a.change_pp < -2]
    return not fails, ", ".join(fails) or "PASS"


def erase(model: Path, settings: dict[str, Any], concept: str, seed: int, k: int, tmp: Path) -> tuple[Any, Path]:
    out = Path(tempfile.mkstemp(suffix=".erasepatch", dir=tmp)[1])
    out.unlink()  # erase_model refuses to overwrite
    return erase_model(model, [concept], None, out, dict(settings, steps=k, seed=seed)), out


def trial(model: Path, settings: dict[str, Any], concept: str, seed: int, k: int, n: int, tmp: Path) -> Trial:
    er, out = erase(model, settings, concept, seed, k, tmp)
    ev = evaluate_model(concept, [out], model=model, config=EvalConfig(n=n))
    out.unlink()
    ok, why = judge(ev)
    return Trial(k, er.loop_seconds, er.total_seconds, list(er.losses), ev.target.after, ok, why, ev.seconds)


def search(
    model: Path,
    settings: dict[str, Any],
    concept: str,
    seed: int,
    grid: list[int],
    refine: int,
    n: int,
    repeats: int,
    tmp: Path,
    log: Any,
) -> Outcome:
    o = Outcome()

    def run(k: int) -> Trial:
        t = o.trials[k] = trial(model, settings, concept, seed, k, n, tmp)
        log(
            f"    steps {k:4d}  loop {t.loop_s:6.2f} s  total {t.total_s:6.2f} s  eval {t.eval_s:5.1f} s  "
            f"target {100 * t.target:5.1f}%  {t.why}"
        )
        return t

    lo = 0
    for k in grid:
        if run(k).ok:
            hi = k
            break
        lo = k
    else:
        return o
    for _ in range(refine):  # bisection: assumes passing is monotonic in k near the first pass (it need not be)
        mid = (lo + hi) // 2
        if mid in (lo, hi):
            break
        if run(mid).ok:
            hi = mid
        else:
            lo = mid
    o.passed = o.trials[hi]
    loops, totals = [o.passed.loop_s], [o.passed.total_s]
    for _ in range(repeats - 1):
        er, out = erase(model, settings, concept, seed, hi, tmp)
        out.unlink()
        o.reproduced &= list(er.losses) == o.passed.losses
        loops.append(er.loop_seconds)
        totals.append(er.total_seconds)
    o.loop_s, o.total_s = min(loops), min(totals)
    log(
        f"    -> {hi} steps; best of {repeats}: loop {o.loop_s:.2f} s, total {o.total_s:.2f} s"
        + ("" if o.reproduced else "; REPEATS DID NOT REPRODUCE THE LOSSES")
    )
    return o


def prefix_pairs(outcomes: list[Outcome]) -> tuple[int, int]:
    """(pairs of consecutive trial lengths whose losses are a prefix of the longer one's, pairs compared)."""
    same = total = 0
    for o in outcomes:
        ks = sorted(o.trials)
        for a, b in zip(ks, ks[1:]):
            total += 1
            same += o.trials[a].losses == o.trials[b].losses[:a]
    return same, total


def median(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}" if xs else "-"


def ratio(
    results: dict[tuple[str, str, int], Outcome],
    recipe: str,
    reference: str,
    concepts: list[str],
    seeds: list[int],
    attr: str,
) -> str:
    rs = [
        getattr(results[recipe, c, s], attr) / getattr(results[reference, c, s], attr)
        for c in concepts
        for s in seeds
        if results[recipe, c, s].passed and results[reference, c, s].passed
    ]
    return f"{statistics.median(rs):.2f}x ({len(rs)})" if rs else "-"


def table(
    results: dict[tuple[str, str, int], Outcome],
    recipes: list[str],
    concepts: list[str],
    seeds: list[int],
    reference: str,
    max_k: int,
) -> list[str]:
    lines = [
        f"| recipe | concept | reached (seeds) | median steps | median loop s | median erase_model s "
        f"| loop / {reference} | erase_model / {reference} "
        f"| not reached within {max_k} steps: lowest target rate (at steps) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in recipes:
        for cs in [[c] for c in concepts] + ([concepts] if len(concepts) > 1 else []):
            outs = [results[r, c, s] for c in cs for s in seeds]
            won = [o for o in outs if o.passed]
            lost = [o.best_target() for o in outs if not o.passed]
            if len(cs) == 1:  # per seed; a target rate within the bar means the neighbours failed it
                cell = ", ".join(
                    f"{100 * t.target:.0f}% ({t.steps}{', neighbours' if t.target <= 0.05 else ''})" for t in lost
                )
            else:
                hit = sum(t.target <= 0.05 for t in lost)
                cell = (
                    f"{len(lost)} seeds; lowest {100 * min(t.target for t in lost):.0f}%; {hit} of them erased the "
                    f"target only with neighbour damage"
                    if lost
                    else ""
                )
            steps = f"{statistics.median([o.passed.steps for o in won]):g}" if won else "-"
            ratios = [
                ratio(results, r, reference, cs, seeds, a) if r != reference else "1" if won else "-"
                for a in ("loop_s", "total_s")
            ]
            lines.append(
                f"| {r} | {cs[0] if len(cs) == 1 else 'all'} | {len(won)}/{len(outs)} | {steps} "
                f"| {median([o.loop_s for o in won])} | {median([o.total_s for o in won])} "
                f"| {ratios[0]} | {ratios[1]} | {cell} |"
            )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"from {', '.join(RECIPES)}")
    ap.add_argument("--reference", default="paper", help="the recipe the ratios are taken against")
    ap.add_argument("--concepts", default="circle,red,striped")
    ap.add_argument("--seeds", default="0,1,2", help="erase seeds (comma-separated)")
    ap.add_argument("--n", type=int, default=8, help="eval images per prompt")
    ap.add_argument("--grid", default="10,20,40,80", help="step counts scanned in order until one passes")
    ap.add_argument("--refine", type=int, default=1, help="bisection steps below the first passing grid count")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the passing erase; its time is the best")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default); 1 keeps the times steady on a shared machine",
    )
    ap.add_argument("--model", default=None, help="a toy-world model folder (default: the built-in one)")
    ap.add_argument("--quick", action="store_true", help="circle, seed 0, n=2, grid 10,40, no refine, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.concepts, args.seeds, args.n, args.grid, args.refine, args.repeats = "circle", "0", 2, "10,40", 0, 1
    recipes, concepts = args.recipes.split(","), args.concepts.split(",")
    seeds, grid = [int(s) for s in args.seeds.split(",")], sorted(int(k) for k in args.grid.split(","))
    unknown = [r for r in recipes + [args.reference] if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)}")
    if args.reference not in recipes:
        recipes.insert(0, args.reference)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else builtin_model_path()
    defaults = model_settings(model).get("erase", {})
    print(
        f"model {model}; its erase defaults: "
        + ", ".join(f"{k}={v}" for k, v in defaults.items() if k not in ("anchor_prompts", "stand_ins"))
    )
    for r in recipes:
        print(f"recipe {r}: " + (", ".join(f"{k}={v}" for k, v in RECIPES[r].items()) or "the model's defaults"))
    print(
        f"grid {grid}, refine {args.refine}, eval n={args.n}, repeats {args.repeats}, "
        f"threads {args.threads or 'default'}; "
        f"load average at start: {open('/proc/loadavg').read().split()[0]}",
        flush=True,
    )
    t0 = time.perf_counter()
    results: dict[tuple[str, str, int], Outcome] = {}
    with tempfile.TemporaryDirectory() as tmp:
        erase(model, RECIPES[recipes[0]], concepts[0], seeds[0], 1, Path(tmp))  # warm-up: imports, caches
        for r in recipes:
            for c in concepts:
                for s in seeds:
                    print(f"  {r} {c} seed {s}", flush=True)
                    results[r, c, s] = search(
                        model,
                        RECIPES[r],
                        c,
                        s,
                        grid,
                        args.refine,
                        args.n,
                        args.repeats,
                        Path(tmp),
                        lambda line: print(line, flush=True),
                    )
    same, total = prefix_pairs(list(results.values()))
    print(f"\nsteps=k losses equal to the first k of the next longer run on the grid: {same} of {total} pairs")
    if not all(o.reproduced for o in results.values()):
        print("WARNING: some repeated erases did not reproduce their losses")
    print(f"wall time {time.perf_counter() - t0:.0f} s; load average at end: {open('/proc/loadavg').read().strip()}\n")
    print("\n".join(table(results, recipes, concepts, seeds, args.reference, grid[-1])))
    print(f"\nreproduce: python {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
