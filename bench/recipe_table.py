"""Which recipe erases most cleanly (issue 11's bars), on the built-in toy-world model, held-out eval seeds.

    python bench/recipe_table.py                       # everything below, n=16 (about 40 min on 2 busy cores)
    python bench/recipe_table.py --sections single     # one section; --recipes, --concepts, --seeds, --n narrow it
    python bench/recipe_table.py --quick               # doco, circle, seed 0, n=2: checks the script runs
    python bench/recipe_table.py --model toy-sdxl      # the same table on another built-in model

Sections, each erase judged with `evaluate_model` (the toy world's judge, `EvalConfig(n)`, seeds 1000 on, which
the model never trained on; the paraphrase rate is its robustness section):

* single: every recipe x concept (a shape, a colour, a pattern) x erase seed;
* keep: the recipes in `--bar-recipes` again with `--keep X` (X a fixed neighbour per concept, `KEEP`);
* multi: the three concepts erased together in one patch, each judged with it;
* stacked: the three single-concept patches of the same seed applied together, each concept judged with them;
* sequential: the same stack, each patch erased `--after` the ones before it (circle; red after circle; striped
  after both).

The bars: target rate after <= 5%; every other concept of the attribute and the other attributes' accuracy at
most 2 pp below the unpatched model's (for multi and stacked, attributes holding another erased concept are
exempt: erasing "red" must lower colour accuracy); paraphrase rate <= 10%; with --keep X, X at most 1 pp below.
Every result is appended to `--out` (JSON lines) as it comes, and a rerun with the same file skips what it holds,
so an interrupted run resumes. The markdown tables at the end are built from that file.

Each erase also records how far its patch moves what the UNet reads (relative L2, per output: "hidden" states and,
on SDXL-family models, te2's "pooled" embedding): for the empty prompt (classifier-free guidance's unconditional
branch, the erase's own report) and, in the single and keep sections, for the 75 full prompts of the world that do
not name the concept ("held drift").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from erasekit.checkpoints.memory import patches_applied
from erasekit.checkpoints.pipeline import load_pipeline
from erasekit.erasing.conditioning import Conditioner, encoder_outputs, output_drift
from erasekit.erasing.erase_job import erase_model
from erasekit.format.patchfile import load_patch
from erasekit.judging.evaluate import EvalConfig, evaluate_model
from erasekit.toyworld import BUILTIN_MODELS, builtin_model_path
from erasekit.toyworld.captions import full_prompts

# name -> settings laid over the model's erasekit.json (its own recipe's tuning, or its erase_recipes entry)
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"recipe": "paper"},  # the published recipe as published: the reference, not tuned
    "anchored": {"recipe": "anchored"},
    "anchored+surgery": {"recipe": "anchored", "surgery": 1.0},
    "doco": {"recipe": "doco"},
}
KEEP = {"circle": "star", "red": "purple", "striped": "hollow"}  # a neighbour to protect per concept
SECTIONS = ("single", "keep", "multi", "stacked", "sequential")


def bars(ev: Any, erased: set[str], keep: str | None) -> dict[str, Any]:
    """One judged patch against the bars: the figures and what failed."""
    others = {o.concept: o.change_pp for o in ev.others}
    attrs = {a: s.change_pp for a, s in ev.attributes.items()}
    checked = {a: d for a, d in attrs.items() if not (erased - {ev.concept}) & _values(a)}
    para = ev.robustness.after if ev.robustness is not None else None
    fails = []
    if ev.target.after > 0.05:
        fails.append(f"target {100 * ev.target.after:.0f}%")
    fails += [f"{c} {d:+.1f}" for c, d in others.items() if d < -2 and c not in erased]
    fails += [f"{a} {d:+.1f}" for a, d in checked.items() if d < -2]
    if para is not None and para > 0.10:
        fails.append(f"paraphrases {100 * para:.0f}%")
    if keep is not None and others.get(keep, 0.0) < -1:
        fails.append(f"kept {keep} {others[keep]:+.1f}")
    return {
        "target_before": ev.target.before,
        "target_after": ev.target.after,
        "others": others,
        "attributes": attrs,
        "paraphrases_before": ev.robustness.before if ev.robustness else None,
        "paraphrases_after": para,
        "fails": fails,
        "paraphrase_wordings": {w.concept: w.after for w in ev.robustness.wordings} if ev.robustness else {},
    }


def _values(attribute: str) -> set[str]:
    from erasekit.toyworld.render import ATTRIBUTES

    return set(ATTRIBUTES.get(attribute, ()))


class Runner:
    def __init__(self, model: Path, n: int, out: Path, tmp: Path, overrides: dict[str, Any] | None = None) -> None:
        self.model, self.n, self.out, self.tmp = model, n, out, tmp
        self.overrides = overrides or {}  # settings laid over every erase (--set, --extra-anchors)
        self.done = {r["key"]: r for r in map(json.loads, out.read_text().splitlines())} if out.exists() else {}
        self.patches: dict[str, Path] = {}  # the single-concept patches (no --keep), for the stacked section
        self.erased = 0
        self.pipe: Any = None  # the model, loaded once to measure held drift
        self.held_before: dict[str, Any] = {}  # concept -> its held prompts' outputs without a patch

    def erase(
        self, name: str, concepts: list[str], seed: int, extra: dict[str, Any], after: list[Path] | None = None
    ) -> tuple[Path, Any]:
        self.erased += 1
        out = self.tmp / f"{self.erased}-{name}-{'+'.join(concepts)}-{seed}.erasepatch"
        report = erase_model(
            self.model, concepts, None, out, RECIPES[name] | self.overrides | extra | {"seed": seed}, after=after or ()
        )
        return out, report

    def held_drift(self, concept: str, patch: Path) -> dict[str, float]:
        """Per output the UNet reads, how far ``patch`` moves the world's full prompts that do not name
        ``concept``."""
        if self.pipe is None:
            self.pipe = load_pipeline(self.model)[0]
        prompts = [p for p, labels in full_prompts() if concept not in labels.values()]
        cond_of = Conditioner(self.pipe, 32, None)

        def outputs(patches: list[Any]) -> dict[str, Any]:
            with patches_applied(self.pipe, patches), torch.no_grad():
                return {k: v.float().clone() for k, v in encoder_outputs(cond_of(prompts, "cpu")).items()}

        if concept not in self.held_before:  # the unpatched outputs, once per concept
            self.held_before[concept] = outputs([])
        after = outputs([load_patch(patch)])
        return {k: round(v, 4) for k, v in output_drift(self.held_before[concept], after).items()}

    def cell(self, key: str, make: Any) -> dict[str, Any]:
        if key not in self.done:
            t = time.perf_counter()
            row = make() | {"key": key, "seconds": round(time.perf_counter() - t, 1)}
            with self.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self.done[key] = row
            print(
                f"  {key}: " + (", ".join(row["fails"]) if row.get("fails") else "PASS") + f"  ({row['seconds']} s)",
                flush=True,
            )
        return self.done[key]

    def judge(self, concept: str, patches: list[Path], erased: set[str], keep: str | None = None) -> dict[str, Any]:
        ev = evaluate_model(concept, patches, model=self.model, config=EvalConfig(n=self.n))
        return bars(ev, erased, keep)

    def single(self, name: str, concept: str, seed: int, keep: str | None = None) -> dict[str, Any]:
        def make() -> dict[str, Any]:
            out, report = self.erase(name, [concept], seed, {"keep": [keep]} if keep else {})
            if not keep:
                self.patches[f"{name}/{concept}/{seed}"] = out
            return (
                self.judge(concept, [out], {concept}, keep)
                | _drift(report)
                | {"held_drift": self.held_drift(concept, out)}
            )

        return self.cell(f"{'keep' if keep else 'single'}/{name}/{concept}/{seed}", make)

    def multi(self, name: str, concepts: list[str], seed: int) -> list[dict[str, Any]]:
        keys = [f"multi/{name}/{c}/{seed}" for c in concepts]
        if all(k in self.done for k in keys):
            return [self.done[k] for k in keys]
        out, report = self.erase(name, concepts, seed, {})
        return [
            self.cell(k, lambda c=c: self.judge(c, [out], set(concepts)) | _drift(report))
            for k, c in zip(keys, concepts)
        ]

    def stacked(self, name: str, concepts: list[str], seed: int) -> list[dict[str, Any]]:
        keys = [f"stacked/{name}/{c}/{seed}" for c in concepts]
        if all(k in self.done for k in keys):
            return [self.done[k] for k in keys]
        for c in concepts:  # the single-concept patches (made again if an earlier run made them)
            if f"{name}/{c}/{seed}" not in self.patches:
                self.patches[f"{name}/{c}/{seed}"] = self.erase(name, [c], seed, {})[0]
        patches = [self.patches[f"{name}/{c}/{seed}"] for c in concepts]
        return [self.cell(k, lambda c=c: self.judge(c, patches, set(concepts))) for k, c in zip(keys, concepts)]

    def sequential(self, name: str, concepts: list[str], seed: int) -> list[dict[str, Any]]:
        keys = [f"sequential/{name}/{c}/{seed}" for c in concepts]
        if all(k in self.done for k in keys):
            return [self.done[k] for k in keys]
        patches: list[Path] = []
        for c in concepts:
            patches.append(self.erase(name, [c], seed, {}, after=list(patches))[0])
        return [self.cell(k, lambda c=c: self.judge(c, patches, set(concepts))) for k, c in zip(keys, concepts)]


def _drift(report: Any) -> dict[str, Any]:
    return {"loop_s": round(report.loop_seconds, 2), "empty_prompt_drift": report.empty_prompt_drift}


def _worst(rows: list[dict[str, Any]], field: str) -> str:
    """The largest drift of each output over ``rows``, e.g. "hidden 0.012, pooled 0.031"."""
    worst: dict[str, float] = {}
    for r in rows:
        for k, v in (r.get(field) or {}).items():
            worst[k] = max(worst.get(k, 0.0), v)
    return ", ".join(f"{k} {v:.3f}" for k, v in worst.items()) or "-"


def summary(rows: list[dict[str, Any]], section: str, names: list[str], concepts: list[str]) -> list[str]:
    lines = [
        f"### {section}",
        "",
        "| recipe | concept | passed | target after (max) | worst neighbour pp | worst attribute pp "
        "| paraphrases after (max) | median loop s | empty-prompt drift (max) | held drift (max) | failures |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for name in names:
        for c in concepts:
            got = [r for r in rows if r["key"].startswith(f"{section}/{name}/{c}/")]
            if not got:
                continue
            neighbours = [d for r in got for k, d in r["others"].items() if section != "multi" or k not in concepts]
            attrs = [d for r in got for d in r["attributes"].values()]
            para = [r["paraphrases_after"] for r in got if r["paraphrases_after"] is not None]
            loops = [r["loop_s"] for r in got if "loop_s" in r]
            fails = "; ".join(f"s{r['key'].rsplit('/', 1)[1]}: {', '.join(r['fails'])}" for r in got if r["fails"])
            loop = f"{statistics.median(loops):.2f}" if loops else "-"
            lines.append(
                f"| {name} | {c} | {sum(not r['fails'] for r in got)}/{len(got)} "
                f"| {100 * max(r['target_after'] for r in got):.0f}% "
                f"| {min(neighbours, default=0):+.1f} | {min(attrs, default=0):+.1f} "
                f"| {f'{100 * max(para):.0f}%' if para else '-'} | {loop} "
                f"| {_worst(got, 'empty_prompt_drift')} | {_worst(got, 'held_drift')} | {fails} |"
            )
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-sd", choices=sorted(BUILTIN_MODELS), help="the built-in model to erase")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument(
        "--bar-recipes",
        default="anchored,doco",
        help="the recipes keep, multi and stacked run for (the candidates for the model's default)",
    )
    ap.add_argument("--concepts", default="circle,red,striped")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n", type=int, default=16, help="eval images per prompt")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--out", default="bench/out/recipe_table.jsonl", help="results, one JSON line per cell")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument(
        "--set",
        default="{}",
        metavar="JSON",
        help="settings laid over every erase, e.g. '{\"keep_weight\": 10}' (use another --out)",
    )
    ap.add_argument(
        "--extra-anchors",
        default="",
        metavar="A|B|...",
        help="prompts added to the model's anchor_prompts, separated by | (use another --out)",
    )
    ap.add_argument("--quick", action="store_true", help="doco, circle, seed 0, n=2, single only, a temporary --out")
    args = ap.parse_args()
    if args.quick:
        args.recipes = args.bar_recipes = "doco"
        args.concepts, args.seeds, args.n, args.sections = "circle", "0", 2, "single"
        args.out = str(Path(tempfile.mkdtemp()) / "quick.jsonl")
    names, bar_names = args.recipes.split(","), args.bar_recipes.split(",")
    concepts, seeds, sections = (
        args.concepts.split(","),
        [int(s) for s in args.seeds.split(",")],
        args.sections.split(","),
    )
    unknown = [r for r in names + bar_names if r not in RECIPES] + [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown recipe or section {unknown[0]!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = json.loads(args.set)
    if args.extra_anchors:
        from erasekit.checkpoints.pipeline import model_settings

        anchors = model_settings(builtin_model_path(args.model)).get("erase", {}).get("anchor_prompts") or []
        overrides["anchor_prompts"] = list(anchors) + args.extra_anchors.split("|")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"eval n={args.n}; results in {out}; load average at start: {open('/proc/loadavg').read().split()[0]}",
        flush=True,
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = Runner(builtin_model_path(args.model), args.n, out, Path(tmp), overrides)
        for s in seeds:
            if "single" in sections:
                for name in names:
                    for c in concepts:
                        run.single(name, c, s)
            for name in bar_names:
                for c in concepts if "keep" in sections else []:
                    run.single(name, c, s, keep=KEEP[c])
                if "multi" in sections and len(concepts) > 1:
                    run.multi(name, concepts, s)
                if "stacked" in sections and len(concepts) > 1:
                    run.stacked(name, concepts, s)
                if "sequential" in sections and len(concepts) > 1:
                    run.sequential(name, concepts, s)
        rows = [r for r in run.done.values() if int(r["key"].rsplit("/", 1)[1]) in seeds]
    print(
        f"\nwall time {time.perf_counter() - t0:.0f} s; load average at end: {open('/proc/loadavg').read().strip()}\n"
    )
    for section in sections:
        print("\n".join(summary(rows, section, names if section == "single" else bar_names, concepts)))
    print(f"reproduce: python {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
