#!/usr/bin/env python
"""Benchmark: apply a patch in place to a full-size SD1.x single file vs. copying that file.

1. Checkpoint: ``build_checkpoint`` from ``bench/real_size.py`` (SD1.x UNet, VAE and CLIP-L from erasekit's
   bundled configs, seeded random weights, one original-layout F16 .safetensors file of 2.13 GB).
   ``--quick``: a tiny one from ``erasekit.testing.make_tiny_pipeline`` (checks the script; figures mean nothing).
2. Patch: ``erasekit.checkpoints.diff.diff_checkpoints`` of the checkpoint's text encoder against a copy whose FFN layers
   (all 12, fc1/fc2 weight and bias) are perturbed. Dense unless ``--rank``.
3. Hashes the checkpoint (which also puts it in the page cache), then each of ``--repeats`` rounds times copy +
   fsync (what a user would do otherwise), ``apply_to_checkpoint([patch], ckpt, in_place=True, strength=...)``
   (patch by path, as the CLI: loading it is timed) and ``revert_from_checkpoint``, and checks that the sha256
   after the revert is the one from before the apply (hashing is not timed). Before each revert it reads the
   undo record: how many tensors it stores whole and how many as residual records, and the share of their
   elements that are exceptions (the inverse arithmetic does not give them back bit for bit).
4. Prints a markdown table of medians, with the bytes the apply wrote (tensors plus journal folder, also as a
   share of the checkpoint), the ratios apply/copy and revert/copy of the same rounds and the CPU time of the
   apply and of the revert (user + system, all threads: what other jobs on the machine move least), then where
   the apply and the revert spend their time (the library functions in ``PHASES``, wrapped with a clock during
   the timed steps); exits 1 if a revert is not bit-exact.

``--convert``: instead, the milliseconds per 768x3072 F16 tensor (SD1.x's FFN weights) of numpy's float16 casts
and of erasekit.format._f16's, which apply and revert use (same bits; checked), interleaved, medians of ``--repeats``.

    python bench/apply_inplace.py [--repeats 3] [--rank R] [--strength S] [--keep]   # about 1 min on 2 cores
    python bench/apply_inplace.py --quick                                            # seconds
    python bench/apply_inplace.py --convert --repeats 30                             # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
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

    from erasekit.checkpoints.diff import diff_checkpoints

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


def undo_stats(folder: Path) -> tuple[int, int, int, int]:
    """(tensors stored whole, tensors stored as residual records, exceptions, elements under residual records)."""
    from erasekit.format import _st

    whole = residual = exceptions = elements = 0
    for undo in folder.glob("*.undo"):
        entries = _st.read_header(undo).entries
        for name, ent in entries.items():
            if name.count("::") == 1:
                whole += 1
            elif name.endswith("::exc_index"):
                residual += 1
                exceptions += ent.numel
                elements += _covered(entries, name.removesuffix("::exc_index"))
    return whole, residual, exceptions, elements


def _covered(entries: dict, name: str) -> int:
    """Elements of the tensor a residual record stands for (the shape of its delta)."""
    if f"{name}::diff" in entries:
        return entries[f"{name}::diff"].numel
    return entries[f"{name}::lora_up"].shape[0] * entries[f"{name}::lora_down"].shape[1]


PHASES = [  # (module, function, what it does): the steps of an apply and a revert, timed on their own
    ("erasekit.checkpoints.apply", "as_patch", "load and check the patch"),
    ("erasekit.checkpoints.apply", "_plan", "arithmetic, hashes, undo records (threads)"),
    ("erasekit.checkpoints.journal", "Journal.write_undo", "write the undo record, fsync"),
    ("erasekit.checkpoints.journal", "Journal.originals", "rebuild the originals from the undo record"),
    ("erasekit.checkpoints.journal", "Journal.write_tensors", "write the tensors in place, fsync"),
]


@contextlib.contextmanager
def phase_clock(spent: dict[str, float]):
    """Add the seconds spent in each of PHASES to ``spent`` while inside (the functions are wrapped, then restored)."""
    saved = []
    for module, attr, label in PHASES:
        owner = importlib.import_module(module)
        *outer, name = attr.split(".")
        for part in outer:
            owner = getattr(owner, part)
        if hasattr(owner, name):  # an erasekit without it: the phase shows as "-"
            saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, _clocked(getattr(owner, name), label, spent))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _clocked(fn, label: str, spent: dict[str, float]):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t

    return run


CPU: list[float] = []  # CPU seconds (user + system, all threads) of each timed step, in order


def timed(fn, *args, **kwargs):
    os.sync()  # the previous step's dirty pages go to disk before the clock starts, not during
    cpu, t = os.times(), time.perf_counter()
    result = fn(*args, **kwargs)
    wall, end = time.perf_counter() - t, os.times()
    CPU.append(end.user - cpu.user + end.system - cpu.system)
    return wall, result


def convert_times(repeats: int, seed: int) -> int:
    """Per-tensor ms of numpy's float16 casts vs erasekit.format._f16 (what an apply does per FFN weight: F16 -> F32, add
    the delta, F32 -> F16; its undo record does it once more, backwards)."""
    import numpy as np

    from erasekit.format import _f16

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((3072, 768)) * 0.016).astype(np.float16)  # sigma of CLIP-L's FFN weights
    term = (rng.standard_normal(w.shape) * 0.002).astype(np.float32)
    x, bits = w.astype(np.float32) + term, w.view(np.uint16)
    cases = [
        ("F16 -> F32", lambda: w.astype(np.float32), lambda: _f16.f16_to_f32(bits)),
        ("F32 -> F16", lambda: x.astype(np.float16), lambda: _f16.f32_to_f16(x)),
        (
            "F16 + delta -> F16 (apply's arithmetic)",
            lambda: (w.astype(np.float32) + term).astype(np.float16),
            lambda: _f16.f16_add(bits, term),
        ),
    ]

    def raw(a: np.ndarray) -> np.ndarray:
        return a.reshape(-1).view(np.uint32 if a.dtype.itemsize == 4 else np.uint16)

    want = [raw(numpy_fn()) for _, numpy_fn, _ in cases]
    times: dict[tuple[int, int], list[float]] = {}
    for _ in range(repeats):
        for i, (name, *fns) in enumerate(cases):
            for j, fn in enumerate(fns):
                t = time.perf_counter()
                got = fn()
                times.setdefault((i, j), []).append(time.perf_counter() - t)
                if not np.array_equal(raw(got), want[i]):
                    print(f"{name}: erasekit.format._f16 differs from numpy")
                    return 1
    load = os.getloadavg()[0]
    print(f"\n| one 768x3072 F16 tensor, median of {repeats} | numpy | erasekit.format._f16 | ratio |")
    print("|---|---:|---:|---:|")
    for i, (name, *_) in enumerate(cases):
        a, b = (statistics.median(times[i, j]) * 1e3 for j in (0, 1))
        print(f"| {name} | {a:.2f} ms | {b:.2f} ms | {b / a:.2f} |")
    print(
        f"\nnumpy {np.__version__}, {os.cpu_count()} CPUs, load average {load:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end; every result equal to numpy's, bit for bit."
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", "--repeat", type=int, default=3, help="rounds; the table shows medians (default 3)")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(__file__).resolve().parent / "out",
        help="where the files go (default bench/out/, git-ignored)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the patch")
    ap.add_argument("--quick", action="store_true", help="a tiny checkpoint: checks that the script runs")
    ap.add_argument("--rank", type=int, default=None, help="a low-rank patch of this rank (default: dense)")
    ap.add_argument("--patch-dtype", choices=("F32", "F16", "BF16"), default="F32", help="default F32")
    ap.add_argument("--strength", type=float, default=1.0, help="apply strength (default 1.0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--convert", action="store_true", help="time the float16 conversions on one tensor instead")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.convert:
        return convert_times(args.repeats, args.seed)

    from erasekit.checkpoints.apply import apply_to_checkpoint, revert_from_checkpoint
    from erasekit.checkpoints.journal import journal_dir

    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt, patch, copy = (
        args.workdir / f"apply_inplace-{n}" for n in ("sd1.safetensors", "patch.erasepatch", "copy.safetensors")
    )
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
            phases: tuple[dict[str, float], dict[str, float]] = ({}, {})
            with phase_clock(phases[0]):
                apply_s, report = timed(apply_to_checkpoint, [patch], ckpt, in_place=True, strength=args.strength)
            apply_cpu = CPU[-1]
            undo = sum(f.stat().st_size for f in journal_dir(ckpt).rglob("*") if f.is_file())
            stats = undo_stats(journal_dir(ckpt))
            with phase_clock(phases[1]):
                revert_s, _ = timed(revert_from_checkpoint, patch, ckpt)
            exact = sha256(ckpt) == before
            rounds.append(
                (copy_s, apply_s, revert_s, report.bytes_written, undo, exact, stats, phases, apply_cpu, CPU[-1])
            )
            print(
                f"round {r + 1}: copy {copy_s:.2f} s, apply {apply_s:.2f} s ({apply_cpu:.2f} s CPU), revert "
                f"{revert_s:.2f} s ({CPU[-1]:.2f} s CPU), bit-exact {exact}",
                flush=True,
            )
    finally:
        if args.keep:
            clean(copy)
        else:
            clean(copy, ckpt, patch)

    copy_s, apply_s, revert_s = (statistics.median(x[i] for x in rounds) for i in range(3))
    written, undo, exact = rounds[0][3], rounds[0][4], all(x[5] for x in rounds)
    whole, residual, exceptions, elements = rounds[0][6]
    kind = f"low-rank r={args.rank}" if args.rank else "dense"
    print(f"\n| {'tiny (--quick)' if args.quick else 'SD1.x F16'} single file, median of {len(rounds)} rounds | |")
    print("|---|---:|")
    for name, value in [
        ("checkpoint", f"{size / 1e9:.3f} GB"),
        ("patch (all FFN layers)", f"{patch_size / 1e6:.1f} MB, {kind} {args.patch_dtype}, strength {args.strength:g}"),
        ("copy + fsync", f"{copy_s:.2f} s"),
        ("apply in place", f"{apply_s:.2f} s"),
        ("revert", f"{revert_s:.2f} s"),
        (
            "CPU time of apply, of revert (user + system, all threads)",
            f"{statistics.median(x[8] for x in rounds):.2f} s, {statistics.median(x[9] for x in rounds):.2f} s",
        ),
        ("apply / copy", f"{apply_s / copy_s:.2f}"),
        ("revert / copy", f"{revert_s / copy_s:.2f}"),
        ("tensors rewritten by apply", f"{written / 1e6:.1f} MB"),
        ("undo record (journal folder)", f"{undo / 1e6:.1f} MB: {whole} tensors whole, {residual} as residual records"),
        (
            "written by apply (tensors + journal)",
            f"{(written + undo) / 1e6:.1f} MB, {100 * (written + undo) / size:.1f}% of the file",
        ),
        (
            "exceptions in residual records",
            f"{100 * exceptions / elements:.2f}% of {elements:,} elements" if elements else "none (no residual record)",
        ),
        ("bit-exact revert (sha256)", "yes" if exact else "NO"),
    ]:
        print(f"| {name} | {value} |")
    print(f"\n| where the time goes (median of {len(rounds)} rounds) | apply | revert |")
    print("|---|---:|---:|")
    for _, _, label in PHASES:
        cells = [statistics.median(x[7][i].get(label, 0.0) for x in rounds) for i in (0, 1)]
        print(f"| {label} | " + " | ".join(f"{c:.2f} s" if c else "-" for c in cells) + " |")
    rest = [statistics.median(x[1 + i] - sum(x[7][i].values()) for x in rounds) for i in (0, 1)]
    print(
        f"| everything else (detect the checkpoint, read and hash the tensors for revert, journal) | "
        f"{rest[0]:.2f} s | {rest[1]:.2f} s |"
    )
    print(
        f"\npage cache: warm (the checkpoint was just written and hashed). {os.cpu_count()} CPUs, "
        f"load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end."
    )
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
