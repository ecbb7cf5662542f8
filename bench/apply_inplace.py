#!/usr/bin/env python
"""Benchmark: apply a patch in place to a full-size SD1.x single file vs. copying that file.

1. Checkpoint: ``build_checkpoint`` from ``bench/real_size.py`` (SD1.x UNet, VAE and CLIP-L from erasekit's
   bundled configs, seeded random weights, one original-layout F16 .safetensors file of 2.13 GB).
   ``--quick``: a tiny one from ``erasekit.testing.make_tiny_pipeline`` (checks the script; figures mean nothing).
2. Patch: ``erasekit.diff.diff_checkpoints`` of the checkpoint's text encoder against a copy whose FFN layers
   (all 12, fc1/fc2 weight and bias) are perturbed. Dense unless ``--rank``.
3. Hashes the checkpoint (which also puts it in the page cache), then each of ``--repeats`` rounds times copy +
   fsync (what a user would do otherwise), ``apply_to_checkpoint([patch], ckpt, in_place=True)`` (patch by path,
   as the CLI: loading it is timed) and ``revert_from_checkpoint``, and checks that the sha256 after the revert
   is the one from before the apply (hashing is not timed). Prints a markdown table of medians; exits 1 if a
   revert is not bit-exact.

    python bench/apply_inplace.py [--repeats 3] [--workdir bench/out] [--keep]   # about 1 min on 2 cores
    python bench/apply_inplace.py --quick                                        # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_size import build_checkpoint, sha256  # noqa: E402  (the SD1.x file bench/real_size.py runs the CLI on)

TE = "cond_stage_model.transformer.text_model."  # the text encoder's keys in an SD1.x single file


def build_tiny(path: Path, seed: int) -> None:
    from erasekit.testing import make_tiny_pipeline, save_single_file

    folder = make_tiny_pipeline(path.with_name(path.stem + "-diffusers"), seed=seed)
    save_single_file(folder, path)
    shutil.rmtree(folder)


def build_patch(ckpt: Path, out: Path, seed: int, rank: int | None, dtype: str) -> None:
    """A patch that changes every FFN layer of the text encoder, extracted by erasekit's own diff."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from erasekit.diff import diff_checkpoints

    with safe_open(ckpt, "pt") as f:  # only the text encoder: the same bytes as in the checkpoint
        te = {k: f.get_tensor(k) for k in f.keys() if k.startswith(TE)}
    base, edited = out.with_name(out.stem + "-base.safetensors"), out.with_name(out.stem + "-edited.safetensors")
    save_file(te, base, metadata={"format": "pt"})
    g = torch.Generator().manual_seed(seed + 1)
    for k, v in te.items():
        if ".mlp.fc" in k:
            te[k] = (v.float() + torch.randn(v.shape, generator=g) * 0.002).to(v.dtype)
    save_file(te, edited, metadata={"format": "pt"})
    try:
        diff_checkpoints(base, edited, output=out, title="bench: all FFN layers", rank=rank, dtype=dtype)
    finally:
        base.unlink()
        edited.unlink()


def copy_fsync(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def timed(fn, *args, **kwargs):
    os.sync()  # the previous step's dirty pages go to disk before the clock starts, not during
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", "--repeat", type=int, default=3, help="rounds; the table shows medians (default 3)")
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out",
                    help="where the files go (default bench/out/, git-ignored)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the patch")
    ap.add_argument("--quick", action="store_true", help="a tiny checkpoint: checks that the script runs")
    ap.add_argument("--rank", type=int, default=None, help="a low-rank patch of this rank (default: dense)")
    ap.add_argument("--patch-dtype", choices=("F32", "F16", "BF16"), default="F32", help="default F32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    from erasekit.apply import apply_to_checkpoint, revert_from_checkpoint
    from erasekit.journal import journal_dir

    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt, patch, copy = (args.workdir / f"apply_inplace-{n}" for n in ("sd1.safetensors", "patch.erasepatch",
                                                                        "copy.safetensors"))
    load = os.getloadavg()[0]

    def clean(*paths: Path) -> None:
        for p in paths:
            p.unlink(missing_ok=True)
        if ckpt in paths:
            shutil.rmtree(journal_dir(ckpt), ignore_errors=True)
            with contextlib.suppress(OSError):
                journal_dir(ckpt).parent.rmdir()  # the .erasekit folder, if nothing else is in it

    try:
        clean(ckpt, patch)  # also the undo journal an interrupted run may have left
        build_s, _ = timed(build_tiny if args.quick else build_checkpoint, ckpt, args.seed)
        patch_s, _ = timed(build_patch, ckpt, patch, args.seed, args.rank, args.patch_dtype)
        size, patch_size = ckpt.stat().st_size, patch.stat().st_size
        print(f"built {ckpt} in {build_s:.0f} s and {patch.name} in {patch_s:.0f} s", flush=True)

        before = sha256(ckpt)  # reads the whole file: copy and apply both start with it in the page cache
        rounds = []
        for r in range(args.repeats):
            copy_s, _ = timed(copy_fsync, ckpt, copy)
            copy.unlink()
            apply_s, report = timed(apply_to_checkpoint, [patch], ckpt, in_place=True)
            undo = sum(f.stat().st_size for f in journal_dir(ckpt).rglob("*") if f.is_file())
            revert_s, _ = timed(revert_from_checkpoint, patch, ckpt)
            exact = sha256(ckpt) == before
            rounds.append((copy_s, apply_s, revert_s, report.bytes_written, undo, exact))
            print(f"round {r + 1}: copy {copy_s:.2f} s, apply {apply_s:.2f} s, revert {revert_s:.2f} s, "
                  f"bit-exact {exact}", flush=True)
    finally:
        if args.keep:
            clean(copy)
        else:
            clean(copy, ckpt, patch)

    copy_s, apply_s, revert_s = (statistics.median(x[i] for x in rounds) for i in range(3))
    written, undo, exact = rounds[0][3], rounds[0][4], all(x[5] for x in rounds)
    kind = f"low-rank r={args.rank}" if args.rank else "dense"
    print(f"\n| {'tiny (--quick)' if args.quick else 'SD1.x F16'} single file, median of {len(rounds)} rounds | |")
    print("|---|---:|")
    for name, value in [("checkpoint", f"{size / 1e9:.3f} GB"),
                        ("patch (all FFN layers)", f"{patch_size / 1e6:.1f} MB, {kind} {args.patch_dtype}"),
                        ("copy + fsync", f"{copy_s:.2f} s"), ("apply in place", f"{apply_s:.2f} s"),
                        ("revert", f"{revert_s:.2f} s"), ("apply / copy", f"{apply_s / copy_s:.2f}"),
                        ("revert / copy", f"{revert_s / copy_s:.2f}"),
                        ("bytes rewritten by apply", f"{written / 1e6:.1f} MB"),
                        ("undo record (journal folder)", f"{undo / 1e6:.1f} MB"),
                        ("bit-exact revert (sha256)", "yes" if exact else "NO")]:
        print(f"| {name} | {value} |")
    print(f"\npage cache: warm (the checkpoint was just written and hashed). {os.cpu_count()} CPUs, "
          f"load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end.")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
