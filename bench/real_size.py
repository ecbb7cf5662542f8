#!/usr/bin/env python
"""Real size: erasekit on a full-size SD1.x single file (random weights, F16, ~2 GB) with no ``--config``.

1. Builds the SD1.x UNet, VAE and CLIP-L text encoder from erasekit's bundled reference configs
   (``src/erasekit/checkpoints/configs/sd1/``), seeded random init on CPU, one component at a time, each cast to F16
   and saved as a diffusers folder; ``erasekit.testing.save_single_file`` turns the folder into ONE
   original-layout (LDM) ``.safetensors`` (it copies values bit for bit, so the file stays F16), and the
   folder is deleted.
2. Writes 2 random 64x64 RGB PNGs.
3. Runs the real CLI (``python -m erasekit``), each step a child process timed on its own: inspect (the
   bundled sd1 config is picked), erase (2 steps, 64 px; the patch records the sd1 config and is at most
   8 MB; its --json time breakdown is printed), generate with the
   patch, apply --in-place (the sha256 changes, inspect lists the patch), apply --revert (the sha256 is the
   original's). The children get an empty HF_HOME and their own latents cache, so nothing is downloaded.

Peak RSS of a step: each CLI run is the only child of a fresh ``python -c`` wrapper, which reports
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (see ``_WRAP``). The build runs in this process: its row shows this
process's own peak (``RUSAGE_SELF``). Hashing is not part of any step's time.

    python bench/real_size.py [--workdir DIR] [--keep]      # about 2 min on 2 idle CPU cores, ~8 GB RAM

Prints a markdown table and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from erasekit.checkpoints.model_configs import CONFIGS_DIR

SD1 = CONFIGS_DIR / "sd1"


@dataclass
class Step:
    name: str
    seconds: float
    peak_gb: float
    ok: bool
    result: str
    code: int = 0  # the CLI's exit code


def build_checkpoint(path: Path, seed: int = 0) -> None:
    """Full-size SD1.x with seeded random weights, as one F16 original-layout .safetensors file."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging as hf_logging

    from erasekit.testing import save_single_file

    hf_logging.disable_progress_bar()

    def cfg(name: str) -> dict:
        return json.loads((SD1 / name / "config.json").read_text())

    makers = {
        "unet": lambda: UNet2DConditionModel.from_config(cfg("unet")),
        "vae": lambda: AutoencoderKL.from_config(cfg("vae")),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**cfg("text_encoder"))),
    }
    folder = path.with_name(path.stem + "-diffusers")
    for i, (name, make) in enumerate(makers.items()):  # one at a time: the F32 UNet alone is 3.4 GB
        torch.manual_seed(seed + i)
        model = make().half()
        model.save_pretrained(folder / name)
        del model
        gc.collect()
    save_single_file(folder, path)
    shutil.rmtree(folder)


def write_images(folder: Path, n: int = 2, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB").save(folder / f"img{i}.png")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# Each step runs under this small wrapper, which reports its child's peak RSS (getrusage(RUSAGE_CHILDREN) of a
# process with one child). Measuring the child straight from this process would not do: at exec, Linux carries
# the parent's own peak RSS (several GB here after the build) over into the child's ru_maxrss.
_WRAP = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); open(sys.argv[1], 'w')"
    ".write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)"
)


def cli(work: Path, name: str, *args: str) -> tuple[float, float, int, str]:
    """Run ``python -m erasekit ARGS`` in ``work``: (wall s, peak RSS GB of that process, exit code, stdout)."""
    env = dict(os.environ, HF_HOME=str(work / "hf-empty"), ERASEKIT_CACHE_DIR=str(work / "cache"))
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    out, err, rss = logs / f"{name}.out", logs / f"{name}.err", logs / f"{name}.maxrss"
    with open(out, "w") as o, open(err, "w") as e:
        t = time.perf_counter()
        code = subprocess.call(
            [sys.executable, "-c", _WRAP, str(rss), sys.executable, "-m", "erasekit", *args],
            cwd=work,
            env=env,
            stdout=o,
            stderr=e,
        )
        seconds = time.perf_counter() - t
    if code != 0:
        sys.stderr.write(f"--- {name} exited {code}; stderr tail:\n{err.read_text()[-3000:]}\n")
    return seconds, int(rss.read_text()) / 2**20, code, out.read_text()  # ru_maxrss is in KiB on Linux


def run_all(work: Path) -> tuple[list[Step], dict]:
    """The whole sequence in ``work``; returns the steps and facts (model size, hashes, config names)."""
    from erasekit.format.patchfile import read_manifest

    work.mkdir(parents=True, exist_ok=True)
    model, patch = work / "model.safetensors", work / "snoopy.erasepatch"
    steps: list[Step] = []
    facts: dict = {}

    def step(name: str, args: list[str], check) -> dict | None:
        seconds, peak, code, stdout = cli(work, name.split()[0] + str(len(steps)), *args)
        data = json.loads(stdout) if code == 0 and stdout.strip().startswith("{") else None
        ok, result = (False, f"exit {code}") if data is None else check(data)
        steps.append(Step(name, seconds, peak, ok, result, code))
        return data

    facts["load_before"] = os.getloadavg()[0]
    t = time.perf_counter()
    build_checkpoint(model)
    facts["model_bytes"] = model.stat().st_size
    steps.append(
        Step(
            "build (this process)",
            time.perf_counter() - t,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            True,
            f"{facts['model_bytes'] / 1e9:.2f} GB F16 single file",
        )
    )
    write_images(work / "images")

    def inspect_check(d: dict) -> tuple[bool, str]:
        facts["config"] = d.get("config")
        return (d.get("config") or "").split(" ")[0] == "sd1", f"{d.get('layout')}; config {d.get('config')}"

    step("inspect", ["inspect", str(model), "--json"], inspect_check)

    def erase_check(d: dict) -> tuple[bool, str]:
        facts["base_config"] = cfg = read_manifest(patch)[0].base.config if patch.is_file() else None
        facts["timings"], facts["steps"] = d.get("timings", {}), d.get("steps", 0)
        ranks = [m.rank for m in read_manifest(patch)[0].deltas.values() if m.rank] if patch.is_file() else []
        facts["patch_mb"], facts["ranks"] = d.get("patch_bytes", 0) / 1e6, ranks
        stored = (
            f"ranks {min(ranks)}-{max(ranks)}, outputs {100 * d.get('output_error', 0):.1f}% off" if ranks else "dense"
        )
        return (
            (cfg or "").split(" ")[0] == "sd1" and facts["patch_mb"] <= 8,
            f"{d.get('steps')} steps, {facts['patch_mb']:.1f} MB patch ({stored}); base.config {cfg}",
        )

    step(
        "erase",
        [
            "erase",
            "--model",
            str(model),
            "--concept",
            "Snoopy",
            "--images",
            "images",
            "--steps",
            "2",
            "--resolution",
            "64",
            "--device",
            "cpu",
            "-o",
            patch.name,
            "--json",
        ],
        erase_check,
    )

    def generate_check(d: dict) -> tuple[bool, str]:
        pngs = [p for p in (work / "gen").glob("*.png") if p.name != "grid.png"]
        return len(pngs) == 1, f"{len(pngs)} PNG ({', '.join(p.name for p in pngs)}) + grid.png"

    step(
        "generate",
        [
            "generate",
            "--model",
            str(model),
            "--patch",
            patch.name,
            "-n",
            "1",
            "--steps",
            "2",
            "--resolution",
            "64",
            "--device",
            "cpu",
            "-o",
            "gen",
            "--json",
            "a photo of Snoopy",
        ],
        generate_check,
    )

    facts["sha_before"] = sha256(model)
    step(
        "apply --in-place",
        ["apply", patch.name, "--to", str(model), "--in-place", "--json"],
        lambda d: (d.get("in_place") is True, f"{d.get('bytes_written', 0) / 1e6:.0f} MB rewritten in place"),
    )
    facts["sha_applied"] = sha256(model)

    def applied_check(d: dict) -> tuple[bool, str]:
        titles = [a.get("title") for a in d.get("applied", [])]
        ok = len(titles) == 1 and facts["sha_applied"] != facts["sha_before"]
        return ok, f"applied: {titles}; sha256 changed: {facts['sha_applied'] != facts['sha_before']}"

    step("inspect (applied)", ["inspect", str(model), "--json"], applied_check)

    def revert_check(d: dict) -> tuple[bool, str]:
        facts["sha_reverted"] = sha256(model)
        same = facts["sha_reverted"] == facts["sha_before"]
        return same, f"sha256 {'equals' if same else 'DIFFERS from'} the original (verified: {d.get('verified')})"

    step("apply --revert", ["apply", "--revert", patch.name, "--to", str(model), "--json"], revert_check)
    return steps, facts


def table(steps: list[Step]) -> str:
    rows = ["| step | wall s | peak RSS GB | result |", "|---|---:|---:|---|"]
    rows += [
        f"| {s.name} | {s.seconds:.1f} | {s.peak_gb:.2f} | {'ok' if s.ok else 'FAIL'}: {s.result} |" for s in steps
    ]
    return "\n".join(rows)


def breakdown(timings: dict, steps: int) -> str:
    """Where the erase's time went (its --json ``timings``), and its fixed cost in optimizer steps: everything
    but the model load and the loop, over the loop's time per step."""
    if not timings or not steps:
        return "(no erase timings)"
    per_step = timings.get("loop", 0.0) / steps
    fixed = sum(v for k, v in timings.items() if k not in ("load", "loop"))
    rows = ["| erase phase | s |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in timings.items()]
    return "\n".join(
        rows
        + [f"| fixed cost (all but load and loop) | {fixed:.2f} = {fixed / per_step:.2f} steps of {per_step:.2f} s |"]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="where the files go (default: a new temp dir under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the model, patch, images and logs")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="erasekit-real-size-", dir="/tmp"))
    try:
        steps, facts = run_all(work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(steps))
    print("\n" + breakdown(facts.get("timings", {}), facts.get("steps", 0)))
    print(
        f"\nmodel file: {facts['model_bytes']:,} bytes; build {steps[0].seconds:.0f} s; "
        f"sha256 {facts['sha_before'][:16]}... (after apply {facts.get('sha_applied', '?')[:16]}...)"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, 1-min load average {facts['load_before']:.2f} before the build; "
        f"work dir {work}{' (kept)' if args.keep else ' (deleted)'}"
    )
    failed = [s.name for s in steps if not s.ok]
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
