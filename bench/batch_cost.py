"""How the cost of erasing grows with the number of concepts (issue #12), on the built-in model.

For N concepts it times, in the same run:

- **separate**: N separate ``erasekit erase -c X`` processes, one after another (what a shell loop does: every
  run imports torch and loads the model again);
- **batch**: one ``erasekit erase --manifest`` process with N jobs (one patch per concept, the model loaded once);
- **batch x2** (with ``--processes 2``): the same manifest under ``accelerate launch --multi_gpu --num_processes 2``
  (two processes sharing the CPU on a machine without GPUs; one per GPU on a GPU machine);
- **one patch**: one job erasing all N concepts into one patch.

It prints a markdown table of medians over ``--repeats`` rounds: wall seconds per variant, seconds per concept,
the batch's model load (paid once) and optimizer loops (summed over jobs), and the ratio separate / batch. Every
variant runs with the settings the built-in model recommends (``--steps`` to override). Run from the repository
root with the virtual environment active::

    python bench/batch_cost.py                  # N = 1, 2, 4, 8; about 6 minutes on 2 cores
    python bench/batch_cost.py --sizes 1 4 --repeats 3 --processes 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONCEPTS = ["circle", "red", "striped", "square", "blue", "star", "green", "triangle"]


def timed(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=os.environ | (env or {}))
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t, r.stdout


def manifest(folder: Path, concepts: list[str], steps: int | None, together: bool) -> None:
    head = f"steps = {steps}\n" if steps else ""
    if together:
        jobs = f"[[jobs]]\nconcept = {json.dumps(concepts)}\noutput = 'all.erasepatch'\n"
    else:
        jobs = "".join(f"[[jobs]]\nconcept = '{c}'\noutput = '{c}.erasepatch'\n" for c in concepts)
    (folder / "jobs.toml").write_text(head + jobs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_round(n: int, steps: int | None, processes: int, work: Path) -> dict[str, float]:
    concepts = CONCEPTS[:n]
    erasekit = [sys.executable, "-m", "erasekit"]
    row: dict[str, float] = {}
    folder = Path(tempfile.mkdtemp(dir=work))
    row["separate"] = sum(
        timed(
            [*erasekit, "erase", "-c", c, "-o", f"{c}.erasepatch", *(["--steps", str(steps)] if steps else [])], folder
        )[0]
        for c in concepts
    )
    shutil.rmtree(folder)
    for variant, together in (("batch", False), ("one patch", True)):
        folder = Path(tempfile.mkdtemp(dir=work))
        manifest(folder, concepts, steps, together)
        row[variant], out = timed([*erasekit, "erase", "--manifest", "jobs.toml", "--json"], folder)
        if variant == "batch":
            jobs = json.loads(out)["jobs"]
            row["load"] = sum(j["load_seconds"] for j in jobs)
            row["loops"] = sum(j["loop_seconds"] for j in jobs)
        shutil.rmtree(folder)
    if processes > 1:
        folder = Path(tempfile.mkdtemp(dir=work))
        manifest(folder, concepts, steps, together=False)
        launch = [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            "-m",
            "erasekit",
            "erase",
            "--manifest",
            "jobs.toml",
            "--json",
        ]
        row[f"batch x{processes}"] = timed(launch, folder)[0]
        shutil.rmtree(folder)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="numbers of concepts (at most 8)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per erase (default: the model's)")
    ap.add_argument("--processes", type=int, default=2, help="processes of the accelerate variant (1: skip it)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="batch_cost-"))
    try:
        rows = {n: [one_round(n, args.steps, args.processes, work) for _ in range(args.repeats)] for n in args.sizes}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    variants = ["separate", "batch", *([f"batch x{args.processes}"] if args.processes > 1 else []), "one patch"]
    print(
        f"built-in model, {os.cpu_count()} CPUs, steps: {args.steps or 'the model default'}, medians of "
        f"{args.repeats} round(s); wall seconds of the whole command(s)\n"
    )
    print(
        "| N | " + " | ".join(variants) + " | separate / batch | batch s per concept | batch: load (once) | "
        "batch: loops (sum) |"
    )
    print("|---" * (len(variants) + 5) + "|")
    for n, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"| {n} | "
            + " | ".join(f"{med[v]:.1f}" for v in variants)
            + f" | {med['separate'] / med['batch']:.2f} | {med['batch'] / n:.1f} | {med['load']:.1f} | {med['loops']:.1f} |"
        )


if __name__ == "__main__":
    main()
