#!/usr/bin/env python
"""Real size for FLUX.1 and SD3.x: a full-size T5-XXL encoder file patched in place, and low-rank compression at
the sizes of SDXL's and T5-XXL's FFN matrices (issue 21, item 5).

1. ``--section compress``: erasekit's two ways of storing a weight delta at low rank, timed per tensor shape:
   ``format.lowrank.low_rank`` (what ``erase --rank auto`` runs per tensor: the top left singular vectors of the
   delta's effect on 1,024 measured input rows, by a seeded randomized range finder) and
   ``format.lowrank.truncated_svd`` (what ``diff --rank`` and ``merge --rank`` run, without inputs). The delta is
   a rank-8 change plus small noise at the scale of an erase's; the inputs are random rows. Each figure is the
   median of ``--repeats`` runs, next to one full SVD of the same matrix (``numpy.linalg.svd``, what
   ``truncated_svd`` ran before it was randomized; ``--no-exact`` skips it); the totals multiply them by the tensors of each model (SDXL: CLIP-L's 24 and
   bigG's 64 FFN matrices; FLUX/SD3's T5-XXL: 72). What an erase's ``compress`` phase adds to these, the
   text-encoder passes over its prompts, is not measured here.
2. ``--section file``: builds a full-size random T5 v1.1 XXL encoder as ComfyUI users keep it
   (``t5xxl_fp16.safetensors``: transformers' key names, every tensor F16, 4.76 B parameters, 9.52 GB), streamed
   to disk one tensor at a time (never all in memory). Makes a patch of all 24 blocks' FFN (72 tensors, low-rank
   ``--rank``, BF16, base fingerprints from the file), then, after hashing the file (which also puts it in the page
   cache), times per round a copy + fsync of the file, ``apply --in-place`` (``apply_to_checkpoint``) and
   ``--revert``, with the bytes the apply wrote and the size of its undo record, and checks that the sha256 after
   the revert is the original's.

    python bench/t5_real_size.py                      # both sections: ~20 GB of disk (file + copy), ~10 min
    python bench/t5_real_size.py --section compress   # a few minutes, no disk
    python bench/t5_real_size.py --quick              # tiny sizes: checks the script runs (figures mean nothing)

Prints markdown tables; exits 1 if a revert is not bit-exact.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apply_inplace import copy_fsync, timed, undo_stats  # noqa: E402  (the SD1.x bench's timing helpers)
from real_size import sha256  # noqa: E402

T5_XXL = (4096, 10240, 24, 32128)  # d_model, d_ff, blocks, vocabulary: google/t5-v1_1-xxl as FLUX.1 and SD3 use it
T5_TINY = (64, 160, 2, 128)
# (model, matrices of that shape in it, out, in): SDXL's CLIP-L (12 layers x fc1, fc2) and bigG (32 x fc1, fc2),
# T5-XXL (24 blocks x wi_0, wi_1, wo)
SHAPES = [
    ("SDXL te1 (CLIP-L)", 12, 3072, 768),
    ("SDXL te1 (CLIP-L)", 12, 768, 3072),
    ("SDXL te2 (bigG)", 32, 5120, 1280),
    ("SDXL te2 (bigG)", 32, 1280, 5120),
    ("T5-XXL", 48, 10240, 4096),
    ("T5-XXL", 24, 4096, 10240),
]
INPUT_ROWS = 1024  # erasing.compress.INPUT_ROWS: the measured input rows per layer


def t5_entries(dims: tuple[int, int, int, int]) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a transformers ``T5EncoderModel`` (v1.1, gated GELU) in its files' order."""
    h, inter, blocks, vocab = dims
    heads = 64 if h == 4096 else 2
    out: list[tuple[str, tuple[int, ...]]] = [("shared.weight", (vocab, h))]
    for i in range(blocks):
        p = f"encoder.block.{i}."
        out += [(p + f"layer.0.SelfAttention.{q}.weight", (h, h)) for q in "qkvo"]
        if i == 0:
            out.append((p + "layer.0.SelfAttention.relative_attention_bias.weight", (32, heads)))
        out.append((p + "layer.0.layer_norm.weight", (h,)))
        out += [(p + f"layer.1.DenseReluDense.{w}.weight", (inter, h)) for w in ("wi_0", "wi_1")]
        out.append((p + "layer.1.DenseReluDense.wo.weight", (h, inter)))
        out.append((p + "layer.1.layer_norm.weight", (h,)))
    return out + [("encoder.final_layer_norm.weight", (h,))]


def build_t5_file(path: Path, dims: tuple[int, int, int, int], seed: int) -> int:
    """Write a random F16 T5 encoder file tensor by tensor (values ~N(0, 0.05^2), norms 1); its size in bytes."""
    entries = t5_entries(dims)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    chunk = 1 << 24
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in entries:
            n = int(np.prod(shape))
            if name.endswith("layer_norm.weight"):
                f.write(np.ones(n, np.float16).tobytes())
                continue
            for start in range(0, n, chunk):
                size = min(chunk, n - start)
                f.write((rng.standard_normal(size, dtype=np.float32) * 0.05).astype(np.float16).tobytes())
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def build_t5_patch(ckpt: Path, out: Path, dims: tuple[int, int, int, int], rank: int, seed: int) -> None:
    """A low-rank patch of every FFN tensor of the T5 file, with its base fingerprints (as an erase writes them)."""
    from erasekit.format import _st
    from erasekit.format.lowrank import LowRank
    from erasekit.format.names import module_name
    from erasekit.format.patchfile import (
        EncoderInfo,
        Method,
        Patch,
        delta_tensors,
        fingerprint,
        new_manifest,
        save_patch,
        storage_dtypes,
    )

    h, inter, blocks, _ = dims
    header = _st.read_header(ckpt)
    rng = np.random.default_rng(seed + 1)
    tensors, deltas, fps = {}, {}, {}
    with open(ckpt, "rb") as f:
        for block in range(blocks):
            for proj in ("wi_0", "wi_1", "wo"):
                key = f"encoder.block.{block}.layer.1.DenseReluDense.{proj}.weight"
                ent = header.entries[key]
                f.seek(ent.begin)
                m = module_name("te3", block, proj)
                fps[f"{m}.weight"] = fingerprint(f.read(ent.nbytes), "F16", tuple(ent.shape))
                out_dim, in_dim = ent.shape
                up = rng.standard_normal((out_dim, rank), dtype=np.float32) * 0.02
                down = rng.standard_normal((rank, in_dim), dtype=np.float32) * 0.02
                stored, deltas[m] = delta_tensors(m, None, None, LowRank(up, down, 0.0, 1.0))  # type: ignore[arg-type]
                tensors.update(stored)
    manifest = new_manifest(
        title=f"bench: T5-XXL, every FFN tensor at rank {rank}",
        architecture="t5-text",
        encoders={"te3": EncoderInfo(hidden=h, intermediate=inter, layers=blocks)},
        fingerprints=fps,
        deltas=deltas,
        method=Method(name="bench", hyperparameters={"rank": rank, "seed": seed}),
        source=ckpt.name,
    )
    save_patch(Patch(manifest, tensors, storage_dtypes(tensors, "BF16")), out)


def compress_section(repeats: int, quick: bool, exact: bool) -> None:
    import torch

    from erasekit.format.lowrank import low_rank, truncated_svd

    torch.set_num_threads(1)
    rows = []
    for model, count, out_dim, in_dim in SHAPES:
        if quick:
            out_dim, in_dim = out_dim // 32, in_dim // 32
        g = torch.Generator().manual_seed(0)
        delta = torch.randn(out_dim, 8, generator=g) @ torch.randn(8, in_dim, generator=g) * 1e-3
        delta += torch.randn(out_dim, in_dim, generator=g) * 1e-5
        inputs = torch.randn(INPUT_ROWS, in_dim, generator=g)
        auto = []
        for _ in range(repeats):
            t = time.perf_counter()
            got = low_rank(delta, inputs, "auto", 0.05, 32)
            auto.append(time.perf_counter() - t)
        svd = []
        for _ in range(repeats):
            t = time.perf_counter()
            truncated_svd(delta.numpy(), 16)
            svd.append(time.perf_counter() - t)
        t = time.perf_counter()
        if exact:
            np.linalg.svd(delta.double().numpy(), full_matrices=False)
        full = time.perf_counter() - t if exact else float("nan")
        rows.append((model, count, out_dim, in_dim, statistics.median(auto), got.rank, statistics.median(svd), full))
        print(f"  {rows[-1]}", flush=True)
    print(
        "\n| FFN matrix | count | low_rank (rank auto) | truncated_svd (rank 16) | exact SVD (once) |"
        "\n|---|---:|---:|---:|---:|"
    )
    for model, count, o, i, a, r, s, full in rows:
        print(f"| {model} {o}x{i} | {count} | {a:.2f} s (rank {r}) | {s:.2f} s | {full:.1f} s |")
    print("\n| model, all FFN matrices | low_rank | truncated_svd | exact SVD |\n|---|---:|---:|---:|")
    for model in ("SDXL", "T5-XXL"):
        picked = [r for r in rows if r[0].startswith(model)]
        totals = [sum(r[1] * r[k] for r in picked) for k in (4, 6, 7)]
        print(f"| {model} | " + " | ".join(f"{t:.1f} s" for t in totals) + " |")
    print(f"\none torch thread; load average {os.getloadavg()[0]:.2f} at end")


def file_section(work: Path, rank: int, repeats: int, quick: bool, keep: bool, seed: int) -> int:
    from erasekit.checkpoints.apply import apply_to_checkpoint, revert_from_checkpoint
    from erasekit.checkpoints.journal import journal_dir

    dims = T5_TINY if quick else T5_XXL
    work.mkdir(parents=True, exist_ok=True)
    ckpt, patch, copy = (work / n for n in ("t5xxl_fp16.safetensors", "t5-bench.erasepatch", "copy.safetensors"))
    load = os.getloadavg()[0]
    rounds = []
    try:
        build_s, size = timed(build_t5_file, ckpt, dims, seed)
        patch_s, _ = timed(build_t5_patch, ckpt, patch, dims, rank, seed)
        patch_size = patch.stat().st_size
        print(f"built {ckpt} ({size / 1e9:.2f} GB) in {build_s:.0f} s and {patch.name} in {patch_s:.0f} s", flush=True)
        before = sha256(ckpt)
        for r in range(repeats):
            copy_s, _ = timed(copy_fsync, ckpt, copy)
            copy.unlink()
            apply_s, report = timed(apply_to_checkpoint, [patch], ckpt, in_place=True)
            undo = sum(f.stat().st_size for f in journal_dir(ckpt).rglob("*") if f.is_file())
            whole, residual, _, _ = undo_stats(journal_dir(ckpt))
            revert_s, _ = timed(revert_from_checkpoint, patch, ckpt)
            exact = sha256(ckpt) == before
            rounds.append((copy_s, apply_s, revert_s, report.bytes_written, undo, whole, residual, exact))
            print(f"round {r + 1}: copy {copy_s:.1f} s, apply {apply_s:.1f} s, revert {revert_s:.1f} s, exact {exact}")
    finally:
        for p in (copy,) if keep else (copy, ckpt, patch):
            p.unlink(missing_ok=True)
        if not keep:
            import shutil

            shutil.rmtree(journal_dir(ckpt).parent, ignore_errors=True)
    copy_s, apply_s, revert_s = (statistics.median(x[i] for x in rounds) for i in range(3))
    written, undo, whole, residual = rounds[0][3:7]
    exact = all(x[7] for x in rounds)
    print(f"\n| {'tiny (--quick)' if quick else 'T5-XXL F16'} encoder file, median of {len(rounds)} rounds | |")
    print("|---|---:|")
    for name, value in [
        ("file", f"{size / 1e9:.2f} GB, built in {build_s:.0f} s"),
        ("patch (72 FFN tensors)" if not quick else "patch", f"{patch_size / 1e6:.1f} MB, rank {rank} BF16"),
        ("copy + fsync", f"{copy_s:.1f} s"),
        ("apply in place", f"{apply_s:.1f} s ({apply_s / copy_s:.2f} of the copy)"),
        ("revert", f"{revert_s:.1f} s ({revert_s / copy_s:.2f} of the copy)"),
        ("tensors rewritten by apply", f"{written / 1e9:.2f} GB ({100 * written / size:.0f}% of the file)"),
        ("undo record", f"{undo / 1e6:.1f} MB: {whole} tensors whole, {residual} as residual records"),
        ("bit-exact revert (sha256)", "yes" if exact else "NO"),
    ]:
        print(f"| {name} | {value} |")
    print(f"\n{os.cpu_count()} CPUs, load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end.")
    return 0 if exact else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", choices=("compress", "file", "both"), default="both")
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--rank", type=int, default=16, help="the patch's rank (default 16)")
    ap.add_argument("--repeats", type=int, default=3, help="compress: runs per shape; file: rounds (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the T5 file and the patch")
    ap.add_argument("--no-exact", action="store_true", help="compress: skip the full SVDs (minutes per T5-XXL matrix)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    args = ap.parse_args(argv)
    if args.section in ("compress", "both"):
        compress_section(args.repeats, args.quick, not args.no_exact)
    if args.section in ("file", "both"):
        return file_section(args.workdir, args.rank, args.repeats, args.quick, args.keep, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
