"""Each built-in model's default erase side by side (issue 22): loop time at equal steps, and the patch it writes.

    python bench/toy_loop_time.py                      # toy-sd, toy-sdxl, toy-flux; circle; 3 repeats
    python bench/toy_loop_time.py --repeats 1 --concept red

Every model erases the concept with its own recommended settings (its erasekit.json: the anchored recipe, 40
epochs at 32 px, 24 anchors a step), which give every model the same number of optimizer steps and the same batch,
so the loop times compare the models, not their settings. The repeats run round-robin (toy-sd, toy-sdxl, toy-flux,
toy-sd, ...), so a change in the machine's load falls on every model alike; the figures are medians, and the
ratios are to toy-sd's median from the same run. Each erase runs on the one torch thread its erasekit.json sets.

Printed per model: optimizer steps, median loop seconds (and the fastest and slowest run) and milliseconds a step, the ratio to toy-sd, the
parameters Adam trained, the patch's bytes on disk, and what it stores per encoder.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from erasekit.erasing.erase_job import erase_model
from erasekit.format.patchfile import load_patch
from erasekit.toyworld import builtin_model_path

MODELS = ("toy-sd", "toy-sdxl", "toy-flux")


def _stored(deltas: dict) -> str:
    """What the patch stores per encoder, e.g. "te1: 4 FFN weights, rank 16"."""
    ranks: dict[str, list[int]] = {}
    for module, info in deltas.items():  # lora_te1_text_model_..., lora_te_text_model_... (SD1: one encoder)
        ranks.setdefault(module.split("_")[1], []).append(0 if info.storage == "dense" else info.rank)
    return ", ".join(f"{enc}: {len(rs)} FFN weights, {_span(rs)}" for enc, rs in sorted(ranks.items()))


def _span(ranks: list[int]) -> str:
    if 0 in ranks:
        return "dense"
    lo, hi = min(ranks), max(ranks)
    return f"rank {lo}" if lo == hi else f"rank {lo}-{hi}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--concept", default="circle")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    models = args.models.split(",")
    loops: dict[str, list[float]] = {m: [] for m in models}
    reports = {}
    print(f"load average at start: {open('/proc/loadavg').read().split()[0]}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for m in models:
                out = Path(tmp) / f"{m}-{r}.erasepatch"
                t = time.perf_counter()
                report = erase_model(builtin_model_path(m), [args.concept], None, out, {"seed": 0})
                loops[m].append(report.loop_seconds)
                deltas = load_patch(out).manifest.deltas
                reports[m] = (report, out.stat().st_size, _stored(deltas))
                print(f"  {m} repeat {r}: loop {report.loop_seconds:.2f} s, erase {time.perf_counter() - t:.1f} s")
    print(f"load average at end: {open('/proc/loadavg').read().strip()}\n")
    base = statistics.median(loops[models[0]])
    print(
        f"| model | steps | loop s (median of {args.repeats}; min-max) | ms a step | x {models[0]} | trained parameters "
        "| patch bytes | deltas stored (encoder: modules, storage) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for m in models:
        report, size, stored = reports[m]
        loop = statistics.median(loops[m])
        print(
            f"| {m} | {report.steps} | {loop:.2f} ({min(loops[m]):.2f}-{max(loops[m]):.2f}) "
            f"| {1000 * loop / report.steps:.0f} | {loop / base:.2f} "
            f"| {report.trained_parameters:,} | {size:,} | {stored} |"
        )
    print(f"\nreproduce: python {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
