"""Erase recipes on the built-in toy-world model, judged by `erasekit eval`: the table behind its defaults.

    python bench/toy_erase_study.py                       # every variant x circle, red, striped; n=16
    python bench/toy_erase_study.py --variants default --concepts circle --n 32 --seeds 0,1,2

Each row: one erase (variant, concept, seed), then eval on held-out seeds: the target rate before/after, the
largest drop among the other concepts of the same attribute, the other two attributes' accuracy before/after,
the steps the erase ran and its loop time. The bars (issue 4): target <= 5%, every other concept and every other
attribute within 2 pp of before, erase < 5 s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from erasekit.checkpoints.pipeline import model_settings
from erasekit.erasing.erase_job import erase_model
from erasekit.judging.evaluate import EvalConfig, evaluate_model
from erasekit.toyworld import builtin_model_path

VARIANTS: dict[str, dict[str, Any]] = {
    # the published recipe, as published
    "paper": {"recipe": "paper", "lr": 1e-5, "epochs": 5, "steps": None},
    # the published loop pushed until it erases something
    "paper-strong": {"recipe": "paper", "lr": 1e-3, "steps": 20},
    # anchored on everyday captions only (what a user of a real model gets without --keep)
    "anchored-generic": {"recipe": "anchored", "anchor_prompts": None},
    # anchored on the toy world's own prompts, without stand-ins (the defaults before 0.2)
    "no-stand-ins": {"stand_ins": {}, "anchor_weight": 30.0},
    # the built-in model's defaults (erasekit.json): anchored on the toy world's own prompts, with stand-ins
    "default": {},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--concepts", default="circle,red,striped")
    ap.add_argument("--seeds", default="0", help="erase seeds (comma-separated)")
    ap.add_argument("--n", type=int, default=16, help="eval images per prompt")
    ap.add_argument("--model", default=None, help="a toy-world model folder (default: the built-in one)")
    args = ap.parse_args()
    model = Path(args.model) if args.model else builtin_model_path()
    defaults = model_settings(model).get("erase", {})
    print(
        f"model {model}; its erase defaults: "
        + ", ".join(f"{k}={v}" for k, v in defaults.items() if k != "anchor_prompts")
    )
    header = (
        f"{'variant':<17} {'concept':<8} {'seed':>4} {'steps':>5} {'loop s':>6}  {'target':>13}  "
        f"{'largest drop':>20}  {'attribute A':>20}  {'attribute B':>20}  bars"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            for concept in args.concepts.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    out = Path(tmp) / f"{variant}-{concept}-{seed}.erasepatch"
                    # laid over the model's defaults (resolution, templates...): steps=None means "use epochs"
                    er = erase_model(model, [concept], None, out, dict(VARIANTS[variant], seed=seed))
                    ev = evaluate_model(concept, [out], model=model, config=EvalConfig(n=args.n))
                    drop = ev.largest_drop
                    attrs = list(ev.attributes.values())
                    ok = (
                        ev.target.after <= 0.05
                        and (drop is None or drop.change_pp >= -2)
                        and all(a.change_pp >= -2 for a in attrs)
                        and er.loop_seconds < 5
                    )
                    cells = [
                        f"{variant:<17}",
                        f"{concept:<8}",
                        f"{seed:>4}",
                        f"{er.steps:>5}",
                        f"{er.loop_seconds:>6.2f}",
                        f"{100 * ev.target.before:5.1f}->{100 * ev.target.after:5.1f}%",
                        f"{(drop.concept + ' ' + format(drop.change_pp, '+.1f') + ' pp') if drop else 'none':>20}",
                    ]
                    cells += [f"{a.concept} {100 * a.before:5.1f}->{100 * a.after:5.1f}%".rjust(20) for a in attrs]
                    cells += [
                        f"(elsewhere {100 * e.after - 100 * e.before:+.1f} pp)"
                        for e in ev.attributes_elsewhere.values()
                    ]
                    print(
                        " ".join(cells[:5]) + "  " + "  ".join(cells[5:]) + ("  PASS" if ok else "  fail"), flush=True
                    )
    print(f"reproduce: python {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
