"""Compact patches against dense ones on the built-in toy-world model: does storing the erase's change at low
rank cost any erasure or preservation?

    python bench/rank_study.py                                   # dense, auto; circle,red,striped x seeds 0,1,2
    python bench/rank_study.py --ranks dense,auto,4,1 --n 32

For each concept and seed, the erase runs once per rank setting with the model's defaults otherwise (the trained
change is the same in every run: the rank only decides how it is stored), then `erasekit eval` judges each
patch on the same held-out seeds. Per setting it prints the patch size, the target rate after, the largest drop
among the other concepts of the same attribute, the largest drop among the other attributes, and each one's
difference from the dense patch of the same erase (pp). The bar (issue 10): every difference within 2 pp.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from erasekit.erasing.erase_job import erase_model
from erasekit.judging.evaluate import EvalConfig, evaluate_model


def judged(concept: str, seed: int, rank: str, n: int, folder: Path) -> dict[str, float]:
    out = folder / f"{concept}-{seed}-{rank}.erasepatch"
    er = erase_model(None, [concept], None, out, {"seed": seed, "rank": rank})
    ev = evaluate_model(concept, [out], config=EvalConfig(n=n))
    ranks = [d.rank for d in er.patch.manifest.deltas.values() if d.rank]
    return {
        "bytes": er.patch_bytes,
        "target": 100 * ev.target.after,
        "neighbour": min([o.change_pp for o in ev.others], default=0.0),
        "attribute": min([a.change_pp for a in ev.attributes.values()], default=0.0),
        "output_error": 100 * er.output_error,
        "ranks": f"{min(ranks)}-{max(ranks)}" if ranks else "dense",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="dense,auto", help="rank settings to compare; the first is the reference")
    ap.add_argument("--concepts", default="circle,red,striped")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n", type=int, default=16, help="eval images per prompt")
    args = ap.parse_args()
    ranks = args.ranks.split(",")
    rows: dict[str, list[dict[str, float]]] = {r: [] for r in ranks}
    print("| concept | seed | rank | patch bytes | ranks | outputs off | target after | neighbour | attribute |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for concept in args.concepts.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                ref = None
                for rank in ranks:
                    r = judged(concept, seed, rank, args.n, Path(tmp))
                    ref = ref or r
                    r |= {f"d_{k}": r[k] - ref[k] for k in ("target", "neighbour", "attribute")}
                    rows[rank].append(r)
                    print(
                        f"| {concept} | {seed} | {rank} | {r['bytes']:,} | {r['ranks']} | {r['output_error']:.1f}% | "
                        f"{r['target']:.1f}% ({r['d_target']:+.1f}) | {r['neighbour']:+.1f} pp ({r['d_neighbour']:+.1f}) | "
                        f"{r['attribute']:+.1f} pp ({r['d_attribute']:+.1f}) |",
                        flush=True,
                    )
    print(f"\nSummary against {ranks[0]} (differences in pp, worst over {len(rows[ranks[0]])} erases):\n")
    print(
        "| rank | median patch bytes | worst target diff | worst neighbour diff | worst attribute diff | within 2 pp |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for rank, rs in rows.items():
        worst = {k: max((r[f"d_{k}"] for r in rs), key=abs) for k in ("target", "neighbour", "attribute")}
        ok = worst["target"] <= 2 and worst["neighbour"] >= -2 and worst["attribute"] >= -2
        print(
            f"| {rank} | {statistics.median(r['bytes'] for r in rs):,.0f} | {worst['target']:+.1f} | "
            f"{worst['neighbour']:+.1f} | {worst['attribute']:+.1f} | {'yes' if ok else 'no'} |"
        )
    print(f"\nreproduce: python {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
