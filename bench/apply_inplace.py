#!/usr/bin/env python
"""Benchmark: apply a patch in place to a ~2 GB single-file checkpoint vs. copying that file.

Requirement measured: "apply in place on a 2 GB single-file checkpoint takes a small fraction
of copying it". The script

1. writes a synthetic SD1.x single-file ``.safetensors`` checkpoint of about ``--size-gb`` GB in
   F16: a text encoder at real CLIP-L size (hidden 768, intermediate 3072, 12 layers, 49408-token
   embedding; seeded random values) plus filler tensors named and shaped like the SD1.5 UNet
   (``model.diffusion_model.*``) and VAE (``first_stage_model.*``). It is streamed to disk (only
   the text encoder and a 64 MB pool of random filler values are held in memory) and reused on
   the next run if it is still there (``--keep``) and unchanged;
2. makes a patch cheaply: two small SD1.x single-file checkpoints holding only the text encoder
   (the same bytes as in the big file, and a copy with perturbed FFN weights in ``--layers``),
   extracted with ``erasekit.diff.diff_checkpoints`` (dense, or low-rank with ``--rank``);
3. times (a) ``shutil.copyfile`` + fsync of the checkpoint, (b) ``apply_to_checkpoint(...,
   in_place=True)`` and (c) ``revert_from_checkpoint``, and checks that the file's sha256 after
   the revert equals the one before the apply (hashing is timed separately, it is not part of
   apply);
4. prints a table, the command line to reproduce it, and exits 1 if the revert is not bit-exact.

Run from the repository root with the project's venv active:

    python bench/apply_inplace.py            # ~2 GB, well under a minute on 2 cores + SSD
    python bench/apply_inplace.py --quick    # ~0.3 GB smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO / "bench" / "out"
BENCH_FORMAT = "erasekit-bench-apply-inplace/1"  # bump when the synthetic checkpoint changes

TE_PREFIX = "cond_stage_model.transformer.text_model."
CLIP_L = (768, 3072, 12)  # hidden, intermediate, layers
CLIP_VOCAB = 49408
F16 = 2  # bytes per element
POOL_VALUES = 32 * 1024 * 1024  # 64 MB of random F16 values, tiled into the filler tensors
GB = 1_000_000_000
MB = 1_000_000


# -- synthetic checkpoint layout ------------------------------------------------------------------

Shape = tuple[int, ...]


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _unet_specs() -> Iterator[tuple[str, Shape]]:
    """The SD1.5 UNet's tensors (ldm naming, real shapes), in a plausible order."""
    p = "model.diffusion_model."

    def res(pre: str, cin: int, c: int) -> Iterator[tuple[str, Shape]]:
        yield from [(f"{pre}in_layers.0.weight", (cin,)), (f"{pre}in_layers.0.bias", (cin,)),
                    (f"{pre}in_layers.2.weight", (c, cin, 3, 3)), (f"{pre}in_layers.2.bias", (c,)),
                    (f"{pre}emb_layers.1.weight", (c, 1280)), (f"{pre}emb_layers.1.bias", (c,)),
                    (f"{pre}out_layers.0.weight", (c,)), (f"{pre}out_layers.0.bias", (c,)),
                    (f"{pre}out_layers.3.weight", (c, c, 3, 3)), (f"{pre}out_layers.3.bias", (c,))]
        if cin != c:
            yield from [(f"{pre}skip_connection.weight", (c, cin, 1, 1)), (f"{pre}skip_connection.bias", (c,))]

    def attn(pre: str, c: int) -> Iterator[tuple[str, Shape]]:
        t = f"{pre}transformer_blocks.0."
        yield from [(f"{pre}norm.weight", (c,)), (f"{pre}norm.bias", (c,)),
                    (f"{pre}proj_in.weight", (c, c, 1, 1)), (f"{pre}proj_in.bias", (c,))]
        for a, kv in (("attn1", c), ("attn2", 768)):
            yield from [(f"{t}{a}.to_q.weight", (c, c)), (f"{t}{a}.to_k.weight", (c, kv)),
                        (f"{t}{a}.to_v.weight", (c, kv)), (f"{t}{a}.to_out.0.weight", (c, c)),
                        (f"{t}{a}.to_out.0.bias", (c,))]
        yield from [(f"{t}ff.net.0.proj.weight", (8 * c, c)), (f"{t}ff.net.0.proj.bias", (8 * c,)),
                    (f"{t}ff.net.2.weight", (c, 4 * c)), (f"{t}ff.net.2.bias", (c,))]
        for n in (1, 2, 3):
            yield from [(f"{t}norm{n}.weight", (c,)), (f"{t}norm{n}.bias", (c,))]
        yield from [(f"{pre}proj_out.weight", (c, c, 1, 1)), (f"{pre}proj_out.bias", (c,))]

    yield from [(f"{p}time_embed.0.weight", (1280, 320)), (f"{p}time_embed.0.bias", (1280,)),
                (f"{p}time_embed.2.weight", (1280, 1280)), (f"{p}time_embed.2.bias", (1280,)),
                (f"{p}input_blocks.0.0.weight", (320, 4, 3, 3)), (f"{p}input_blocks.0.0.bias", (320,))]
    block, cin = 1, 320
    for level, c in enumerate((320, 640, 1280, 1280)):
        for _ in range(2):
            yield from res(f"{p}input_blocks.{block}.0.", cin, c)
            if level < 3:
                yield from attn(f"{p}input_blocks.{block}.1.", c)
            block, cin = block + 1, c
        if level < 3:
            yield from [(f"{p}input_blocks.{block}.0.op.weight", (c, c, 3, 3)), (f"{p}input_blocks.{block}.0.op.bias", (c,))]
            block += 1
    yield from res(f"{p}middle_block.0.", 1280, 1280)
    yield from attn(f"{p}middle_block.1.", 1280)
    yield from res(f"{p}middle_block.2.", 1280, 1280)
    skips = [320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280]
    block, cin = 0, 1280
    for level, c in enumerate((1280, 1280, 640, 320)):
        for i in range(3):
            yield from res(f"{p}output_blocks.{block}.0.", cin + skips.pop(), c)
            sub = 1
            if level > 0:
                yield from attn(f"{p}output_blocks.{block}.1.", c)
                sub = 2
            if i == 2 and level < 3:
                yield from [(f"{p}output_blocks.{block}.{sub}.conv.weight", (c, c, 3, 3)),
                            (f"{p}output_blocks.{block}.{sub}.conv.bias", (c,))]
            block, cin = block + 1, c
    yield from [(f"{p}out.0.weight", (320,)), (f"{p}out.0.bias", (320,)),
                (f"{p}out.2.weight", (4, 320, 3, 3)), (f"{p}out.2.bias", (4,))]


def _vae_specs() -> Iterator[tuple[str, Shape]]:
    """The SD VAE's tensors (ldm naming, real shapes)."""
    p = "first_stage_model."

    def res(pre: str, cin: int, c: int) -> Iterator[tuple[str, Shape]]:
        yield from [(f"{pre}norm1.weight", (cin,)), (f"{pre}norm1.bias", (cin,)),
                    (f"{pre}conv1.weight", (c, cin, 3, 3)), (f"{pre}conv1.bias", (c,)),
                    (f"{pre}norm2.weight", (c,)), (f"{pre}norm2.bias", (c,)),
                    (f"{pre}conv2.weight", (c, c, 3, 3)), (f"{pre}conv2.bias", (c,))]
        if cin != c:
            yield from [(f"{pre}nin_shortcut.weight", (c, cin, 1, 1)), (f"{pre}nin_shortcut.bias", (c,))]

    def mid(pre: str) -> Iterator[tuple[str, Shape]]:
        yield from res(f"{pre}mid.block_1.", 512, 512)
        a = f"{pre}mid.attn_1."
        yield from [(f"{a}norm.weight", (512,)), (f"{a}norm.bias", (512,))]
        for n in ("q", "k", "v", "proj_out"):
            yield from [(f"{a}{n}.weight", (512, 512, 1, 1)), (f"{a}{n}.bias", (512,))]
        yield from res(f"{pre}mid.block_2.", 512, 512)

    chans = (128, 256, 512, 512)
    e = f"{p}encoder."
    yield from [(f"{e}conv_in.weight", (128, 3, 3, 3)), (f"{e}conv_in.bias", (128,))]
    cin = 128
    for i, c in enumerate(chans):
        for j in range(2):
            yield from res(f"{e}down.{i}.block.{j}.", cin, c)
            cin = c
        if i < 3:
            yield from [(f"{e}down.{i}.downsample.conv.weight", (c, c, 3, 3)), (f"{e}down.{i}.downsample.conv.bias", (c,))]
    yield from mid(e)
    yield from [(f"{e}norm_out.weight", (512,)), (f"{e}norm_out.bias", (512,)),
                (f"{e}conv_out.weight", (8, 512, 3, 3)), (f"{e}conv_out.bias", (8,)),
                (f"{p}quant_conv.weight", (8, 8, 1, 1)), (f"{p}quant_conv.bias", (8,)),
                (f"{p}post_quant_conv.weight", (4, 4, 1, 1)), (f"{p}post_quant_conv.bias", (4,))]
    d = f"{p}decoder."
    yield from [(f"{d}conv_in.weight", (512, 4, 3, 3)), (f"{d}conv_in.bias", (512,))]
    yield from mid(d)
    cin = 512
    for i in reversed(range(4)):
        c = chans[i]
        for j in range(3):
            yield from res(f"{d}up.{i}.block.{j}.", cin, c)
            cin = c
        if i > 0:
            yield from [(f"{d}up.{i}.upsample.conv.weight", (c, c, 3, 3)), (f"{d}up.{i}.upsample.conv.bias", (c,))]
    yield from [(f"{d}norm_out.weight", (128,)), (f"{d}norm_out.bias", (128,)),
                (f"{d}conv_out.weight", (3, 128, 3, 3)), (f"{d}conv_out.bias", (3,))]


def _take(specs: Callable[[], Iterator[tuple[str, Shape]]], budget: int, prefix: str) -> list[tuple[str, Shape]]:
    """Tensors from ``specs`` in order while they fit in ``budget`` bytes (cycling with a renamed
    copy of the network if one is not enough); stops at the first one that does not fit."""
    out: list[tuple[str, Shape]] = []
    used, cycle = 0, 0
    while True:
        for name, shape in specs():
            n = _numel(shape) * F16
            if used + n > budget:
                return out
            if cycle:
                name = name.replace(prefix, f"{prefix}copy{cycle}.", 1)
            out.append((name, shape))
            used += n
        cycle += 1


def te_shapes() -> dict[str, Shape]:
    """Key -> shape of a transformers CLIPTextModel at CLIP-L size (as ``erasekit.testing.hf_text_encoder``)."""
    h, inter, n = CLIP_L
    out: dict[str, Shape] = {"embeddings.token_embedding.weight": (CLIP_VOCAB, h),
                             "embeddings.position_embedding.weight": (77, h),
                             "final_layer_norm.weight": (h,), "final_layer_norm.bias": (h,)}
    for i in range(n):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[p + f"self_attn.{proj}.weight"], out[p + f"self_attn.{proj}.bias"] = (h, h), (h,)
        for ln in ("layer_norm1", "layer_norm2"):
            out[p + f"{ln}.weight"], out[p + f"{ln}.bias"] = (h,), (h,)
        out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = (inter, h), (inter,)
        out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = (h, inter), (h,)
    return {TE_PREFIX + k: v for k, v in out.items()}


PAD_NAME = "model.diffusion_model.out.2.bench_pad"  # 1-D filler that brings the file to the requested size


def plan_checkpoint(target_bytes: int, metadata: dict[str, str]) -> tuple[list[tuple[str, Shape]], list[str]]:
    """All tensors of the big checkpoint (sorted by name) and the notes on how it was sized."""
    te = te_shapes()
    te_bytes = sum(_numel(s) * F16 for s in te.values())
    notes = []
    filler = target_bytes - te_bytes - 200_000  # leave room for the header
    if filler < 0:
        notes.append(f"--size-gb is below the text encoder alone ({te_bytes / GB:.3f} GB); no filler added")
        filler = 0
    vae = _take(_vae_specs, int(filler * 0.08), "first_stage_model.")
    vae_bytes = sum(_numel(s) * F16 for _, s in vae)
    unet = _take(_unet_specs, filler - vae_bytes, "model.diffusion_model.")
    specs = dict(te) | dict(vae) | dict(unet)
    used = sum(_numel(s) * F16 for s in specs.values())
    # Size the pad so that header + data land on the target (to within the header's 8-byte alignment).
    for _ in range(3):
        header = build_header(sorted(specs.items()), metadata)
        pad = (target_bytes - len(header) - used) // F16
        if pad <= 0:
            specs.pop(PAD_NAME, None)
            break
        specs[PAD_NAME] = (pad,)
    return sorted(specs.items()), notes


# -- writing ---------------------------------------------------------------------------------------

def build_header(specs: list[tuple[str, Shape]], metadata: dict[str, str]) -> bytes:
    """safetensors header (length prefix included) for F16 ``specs`` stored in the given order."""
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = metadata
    off = 0
    for name, shape in specs:
        n = _numel(shape) * F16
        obj[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_safetensors(path: Path, specs: list[tuple[str, Shape]], metadata: dict[str, str],
                      data: Callable[[str, int], Iterator[memoryview]]) -> None:
    """Stream a safetensors file: ``data(name, nbytes)`` yields the tensor's bytes in pieces.
    Written to a temporary name, fsynced, then renamed (an interrupted build is never reused)."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(build_header(specs, metadata))
        for name, shape in specs:
            want, got = _numel(shape) * F16, 0
            for piece in data(name, want):
                f.write(piece)
                got += len(piece)
            if got != want:
                raise RuntimeError(f"internal error: wrote {got} bytes for {name}, expected {want}")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def make_text_encoder(seed: int):  # -> dict[str, torch.Tensor] (F16)
    """The CLIP-L text encoder with seeded random values, keys in SD1.x single-file naming."""
    import torch

    from erasekit.testing import hf_text_encoder

    sd = hf_text_encoder(CLIP_L, torch.Generator().manual_seed(seed), vocab=CLIP_VOCAB)
    out = {}
    for k in list(sd):
        out[TE_PREFIX + k] = sd.pop(k).to(torch.float16).contiguous()
    expected = te_shapes()
    if {k: tuple(v.shape) for k, v in out.items()} != expected:
        raise RuntimeError("erasekit.testing.hf_text_encoder no longer matches this benchmark's key list; "
                           "update te_shapes()")
    return out


def edited_copy(te, layers: list[int], seed: int):
    """``te`` with the FFN weights and biases of ``layers`` perturbed (about 10% of their scale)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1000)
    out = dict(te)
    for i in layers:
        for proj in ("fc1", "fc2"):
            for kind in ("weight", "bias"):
                k = f"{TE_PREFIX}encoder.layers.{i}.mlp.{proj}.{kind}"
                t = te[k].float()
                out[k] = (t + torch.randn(t.shape, generator=g) * 0.002).to(torch.float16)
    return out


def _tensor_source(tensors) -> Callable[[str, int], Iterator[memoryview]]:
    def data(name: str, nbytes: int) -> Iterator[memoryview]:
        yield memoryview(tensors[name].numpy()).cast("B")
    return data


def _filler_source(te, pool: memoryview) -> Callable[[str, int], Iterator[memoryview]]:
    """Text-encoder tensors from ``te``; any other tensor tiles the random ``pool`` from a
    name-dependent offset (so tensors differ from each other)."""
    def data(name: str, nbytes: int) -> Iterator[memoryview]:
        if name in te:
            yield memoryview(te[name].numpy()).cast("B")
            return
        off = (int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) * F16) % len(pool)
        while nbytes:
            n = min(nbytes, len(pool) - off)
            yield pool[off:off + n]
            nbytes -= n
            off = 0
    return data


# -- helpers ---------------------------------------------------------------------------------------

def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def read_range(path: Path, begin: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(begin)
        return f.read(end - begin)


def journal_entries(ckpt: Path) -> int | None:
    """Entries in the checkpoint's erasekit undo journal (None: no journal)."""
    from erasekit.journal import journal_dir

    j = journal_dir(ckpt) / "journal.json"
    if not j.exists():
        return None
    try:
        return len(json.loads(j.read_text()).get("entries", []))
    except (OSError, ValueError):
        return -1


def remove_checkpoint(ckpt: Path) -> None:
    from erasekit.journal import journal_dir

    ckpt.unlink(missing_ok=True)
    jd = journal_dir(ckpt)
    if jd.exists():
        shutil.rmtree(jd)
    with contextlib.suppress(OSError):
        jd.parent.rmdir()  # <dir>/.erasekit, if nothing else lives there


class RSS:
    """Peak resident set size of this process over a section (Linux: VmHWM, reset via clear_refs)."""

    def __init__(self) -> None:
        self.ok = Path("/proc/self/clear_refs").exists()
        self.base = self.peak = 0

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    @contextlib.contextmanager
    def measure(self) -> Iterator[RSS]:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # give freed heap back, so the baseline is honest
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        if self.ok:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.ok = False
        self.base = self._status("VmRSS")
        yield self
        self.peak = self._status("VmHWM") if self.ok else 0


def io_written() -> int | None:
    """Bytes this process has sent (or caused to be sent) to storage so far (Linux /proc/self/io)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class OtherCPU:
    """CPU time that other processes used while a section ran (all CPUs' busy time from /proc/stat
    minus this process's own), in CPU-seconds: a check that the machine was quiet."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.seconds = 0.0

    def _busy(self) -> float | None:
        try:
            f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
        return (sum(f[:8]) - idle) / self.tick

    @contextlib.contextmanager
    def measure(self) -> Iterator[OtherCPU]:
        b0, t0 = self._busy(), os.times()
        yield self
        b1, t1 = self._busy(), os.times()
        own = (t1.user - t0.user) + (t1.system - t0.system)
        self.seconds = max(0.0, b1 - b0 - own) if b0 is not None and b1 is not None else float("nan")


def _delta(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else b - a


def parse_layers(text: str, n: int) -> list[int]:
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(range(int(a), int(b) + 1))
        elif part:
            out.add(int(part))
    if not out or min(out) < 0 or max(out) >= n:
        raise ValueError(f"--layers must name layers 0..{n - 1}, got {text!r}")
    return sorted(out)


def fmt_bytes(n: int) -> str:
    return f"{n / GB:.3f} GB" if n >= GB else f"{n / MB:.1f} MB"


@dataclass
class Round:
    copy_s: float
    copyfile_s: float
    fsync_s: float
    apply_s: float
    apply_reported_s: float
    revert_s: float
    hash_after_s: float
    bytes_written: int
    undo_bytes: int
    io_copy: int | None
    io_apply: int | None
    io_revert: int | None
    other_cpu: float  # CPU-seconds other processes used during copy + apply + revert
    bit_exact: bool
    apply_peak_rss: int
    apply_base_rss: int


# -- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--size-gb", type=float, default=None, help="checkpoint size in GB (10^9 bytes; default 2.0)")
    size.add_argument("--quick", action="store_true", help="a ~0.3 GB checkpoint, for a fast smoke test")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where files go (default bench/out/, git-ignored)")
    ap.add_argument("--layers", default="0-11", help="FFN layers the patch changes, e.g. 0-11 (default) or 3,5,7")
    ap.add_argument("--rank", type=int, default=None, help="make a low-rank patch of this rank (default: dense)")
    ap.add_argument("--patch-dtype", choices=("F32", "F16", "BF16"), default="F32",
                    help="how the patch stores its deltas (default F32, diff_checkpoints' default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="copy/apply/revert rounds; the table shows medians (default 3)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's own choice, as the CLI gets)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint (reused next run) and the patch")
    args = ap.parse_args(argv)
    size_gb = 0.3 if args.quick else (args.size_gb if args.size_gb is not None else 2.0)
    try:
        layers = parse_layers(args.layers, CLIP_L[2])
    except ValueError:
        ap.error(f"--layers must name layers 0..{CLIP_L[2] - 1} like 0-11 or 3,5,7, got {args.layers!r}")
    if args.rank is not None and args.rank < 1:
        ap.error("--rank must be at least 1")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    import numpy as np
    import torch

    import erasekit
    from erasekit.apply import apply_to_checkpoint, revert_from_checkpoint
    from erasekit.diff import diff_checkpoints
    from erasekit.journal import journal_dir
    from erasekit.patchfile import load_patch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    target = int(round(size_gb * GB / 2)) * 2
    metadata = {"format": "pt", "erasekit_bench": json.dumps({"format": BENCH_FORMAT, "seed": args.seed})}
    specs, notes = plan_checkpoint(target, metadata)
    header = build_header(specs, metadata)
    total = len(header) + sum(_numel(s) * F16 for _, s in specs)
    # every file name starts with "apply_inplace-": bench/out is shared with other scripts
    big = work / f"apply_inplace-sd1-{total}-seed{args.seed}.safetensors"
    base_small, edited_small = work / "apply_inplace-te-base.safetensors", work / "apply_inplace-te-edited.safetensors"
    patch_path = work / "apply_inplace-patch.erasepatch"
    copy_path = work / "apply_inplace-copy.safetensors"
    offsets, off = {}, len(header)
    for name, shape in specs:
        offsets[name] = (off, off + _numel(shape) * F16)
        off += _numel(shape) * F16

    load_start = os.getloadavg()[0]
    print("erasekit benchmark: apply --in-place vs. copying a single-file checkpoint", flush=True)
    ok = False
    try:
        # 1. the text encoder (needed for the patch whether or not the big file is reused)
        t0 = time.perf_counter()
        te = make_text_encoder(args.seed)
        te_gen_s = time.perf_counter() - t0

        # 2. the big checkpoint
        reason = None
        if not big.exists():
            reason = "not there"
        elif big.stat().st_size != total:
            reason = f"size {big.stat().st_size} != {total}"
        elif read_range(big, 0, len(header)) != header:
            reason = "header differs"
        elif journal_entries(big) not in (None, 0):
            reason = "it has erasekit journal entries (an earlier run was interrupted)"
        if reason is None:
            ckpt_note = "reused from an earlier --keep run (unchanged header and size, empty undo journal)"
            build_s = 0.0
        else:
            if big.exists():
                print(f"  rebuilding {big.name}: {reason}", flush=True)
            remove_checkpoint(big)
            for stale in work.glob("apply_inplace-sd1-*.safetensors*"):  # other sizes/seeds from earlier runs
                remove_checkpoint(stale)
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(args.seed + 1)
            pool_t = (torch.randn(POOL_VALUES, generator=g) * 0.02).to(torch.float16)
            pool = memoryview(pool_t.numpy()).cast("B")
            write_safetensors(big, specs, metadata, _filler_source(te, pool))
            del pool, pool_t
            build_s = time.perf_counter() - t0
            ckpt_note = f"freshly written in {build_s:.1f} s (streamed, fsynced)"
        print(f"  checkpoint: {big}  [{ckpt_note}]", flush=True)

        # 3. the patch: diff of two small SD1.x files holding only the text encoder
        t0 = time.perf_counter()
        for p in (base_small, edited_small, patch_path):
            p.unlink(missing_ok=True)
        te_specs = sorted((k, tuple(v.shape)) for k, v in te.items())
        write_safetensors(base_small, te_specs, {"format": "pt"}, _tensor_source(te))
        edited = edited_copy(te, layers, args.seed)
        write_safetensors(edited_small, te_specs, {"format": "pt"}, _tensor_source(edited))
        del edited, te
        gc.collect()
        rep = diff_checkpoints(base_small, edited_small, output=patch_path, title="bench patch", rank=args.rank,
                               dtype=args.patch_dtype)
        patch_s = time.perf_counter() - t0
        base_small.unlink()
        edited_small.unlink()
        patch_bytes = patch_path.stat().st_size
        kind = f"low-rank r={args.rank}" if args.rank else "dense"
        print(f"  patch: {patch_path.name}, {kind} {args.patch_dtype}, layers {args.layers} "
              f"({len(layers)} of 12, fc1+fc2 weight+bias), {fmt_bytes(patch_bytes)}, made in {patch_s:.1f} s "
              f"(text encoder generated in {te_gen_s:.1f} s)", flush=True)
        t0 = time.perf_counter()
        load_patch(patch_path)
        patch_load_s = time.perf_counter() - t0
        gc.collect()

        # the bytes the patch touches, for a cheap "did apply change anything" check
        probe = offsets[f"{TE_PREFIX}encoder.layers.{layers[0]}.mlp.fc1.weight"]
        ffn_bytes = sum(offsets[f"{TE_PREFIX}encoder.layers.{i}.mlp.{p}.{k}"][1]
                        - offsets[f"{TE_PREFIX}encoder.layers.{i}.mlp.{p}.{k}"][0]
                        for i in layers for p in ("fc1", "fc2") for k in ("weight", "bias"))

        # 4. hash before (this also reads the whole file into the page cache: copy and apply both start warm)
        os.sync()
        t0 = time.perf_counter()
        sha_before = sha256_file(big)
        hash_before_s = time.perf_counter() - t0
        probe_before = read_range(big, *probe)

        rounds: list[Round] = []
        rss = RSS()
        for r in range(args.repeat):
            # (a) copy + fsync
            copy_path.unlink(missing_ok=True)
            os.sync()
            others = [OtherCPU(), OtherCPU(), OtherCPU()]
            section = others[0].measure()
            section.__enter__()
            w0 = io_written()
            t0 = time.perf_counter()
            shutil.copyfile(big, copy_path)
            t1 = time.perf_counter()
            with open(copy_path, "rb+") as f:
                os.fsync(f.fileno())
            fsync_dir(copy_path.parent)
            t2 = time.perf_counter()
            w1 = io_written()
            section.__exit__(None, None, None)
            copy_path.unlink()

            # (b) apply in place (by path, as the CLI does: loading the patch is part of it)
            os.sync()
            gc.collect()
            with rss.measure(), others[1].measure():
                w2 = io_written()
                t3 = time.perf_counter()
                arep = apply_to_checkpoint([patch_path], big, in_place=True)
                t4 = time.perf_counter()
                w3 = io_written()
            undo_bytes = sum(p.stat().st_size for p in journal_dir(big).glob("*.undo"))
            if read_range(big, *probe) == probe_before:
                raise RuntimeError("apply reported success but the first patched tensor is unchanged")

            # (c) revert
            os.sync()
            with others[2].measure():
                w4 = io_written()
                t5 = time.perf_counter()
                rrep = revert_from_checkpoint(patch_path, big)
                t6 = time.perf_counter()
                w5 = io_written()
            if rrep.remaining:
                raise RuntimeError(f"after revert the journal still lists {rrep.remaining}")

            t7 = time.perf_counter()
            sha_after = sha256_file(big)
            hash_after_s = time.perf_counter() - t7
            rounds.append(Round(t2 - t0, t1 - t0, t2 - t1, t4 - t3, arep.seconds, t6 - t5, hash_after_s,
                                arep.bytes_written, undo_bytes, _delta(w0, w1), _delta(w2, w3), _delta(w4, w5),
                                sum(o.seconds for o in others),
                                sha_after == sha_before and rrep.verified,
                                rss.peak, rss.base))
            if args.repeat > 1:
                x = rounds[-1]
                print(f"  round {r + 1}: copy {x.copy_s:.2f} s, apply {x.apply_s:.2f} s, revert {x.revert_s:.2f} s, "
                      f"bit-exact {'yes' if x.bit_exact else 'NO'}; other processes used {others[0].seconds:.2f} / "
                      f"{others[1].seconds:.2f} / {others[2].seconds:.2f} CPU-s meanwhile", flush=True)

        # 5. report
        med = lambda f: statistics.median(f(x) for x in rounds)  # noqa: E731
        copy_s, apply_s, revert_s = med(lambda x: x.copy_s), med(lambda x: x.apply_s), med(lambda x: x.revert_s)
        # the round whose copy (apply) time is the median, for the breakdown of that figure
        mc = sorted(rounds, key=lambda x: x.copy_s)[(len(rounds) - 1) // 2]
        ma = sorted(rounds, key=lambda x: x.apply_s)[(len(rounds) - 1) // 2]
        written = rounds[0].bytes_written
        ok = all(x.bit_exact for x in rounds)
        unit = " (median of %d)" % len(rounds) if len(rounds) > 1 else ""
        mem = (f"{rounds[0].apply_peak_rss / MB:.0f} MB peak RSS (process was at {rounds[0].apply_base_rss / MB:.0f} MB "
               "before)" if rounds[0].apply_peak_rss else "n/a")
        io = [rounds[0].io_copy, rounds[0].io_apply, rounds[0].io_revert]
        io_row = ("copy {}, apply {}, revert {}  (/proc/self/io write_bytes, first round)".format(
            *(fmt_bytes(x) for x in io)) if None not in io else "n/a (no /proc/self/io)")
        rows = [
            ("checkpoint size", f"{fmt_bytes(total)} ({total:,} bytes, {len(specs)} F16 tensors)"),
            ("patch size", f"{fmt_bytes(patch_bytes)} ({kind} {args.patch_dtype}, {len(layers)} layers)"),
            ("bytes rewritten by apply", f"{fmt_bytes(written)} ({written:,} bytes, {100 * written / total:.1f}% of "
                                         f"the checkpoint; FFN tensors in the file: {ffn_bytes:,} bytes)"),
            ("undo record written by apply", f"{fmt_bytes(rounds[0].undo_bytes)} (the original bytes, in "
                                             f"{journal_dir(big).parent.name}/{big.name}/)"),
            ("bytes sent to storage", io_row),
            ("copy seconds" + unit, f"{copy_s:.3f} s  (copyfile {mc.copyfile_s:.3f} s + fsync {mc.fsync_s:.3f} s"
                                    + (f" in the round of {mc.copy_s:.3f} s)" if len(rounds) > 1 else ")")),
            ("apply-in-place seconds" + unit, f"{apply_s:.3f} s  (ApplyReport.seconds {ma.apply_reported_s:.3f} s; "
                                              f"load_patch alone {patch_load_s:.3f} s)"),
            ("revert seconds" + unit, f"{revert_s:.3f} s"),
            ("ratio apply / copy", f"{apply_s / copy_s:.3f}  (revert / copy {revert_s / copy_s:.3f})"),
            ("bit-exact revert", "yes" if ok else "NO"),
            ("sha256 (not part of apply)", f"{sha_before[:16]}...  hashing took {hash_before_s:.2f} s before, "
                                           f"{med(lambda x: x.hash_after_s):.2f} s after"),
            ("apply memory", mem),
        ]
        w = max(len(k) for k, _ in rows)
        print()
        for k, v in rows:
            print(f"  {k:<{w}}  {v}")
        print()
        for n in notes:
            print(f"  note: {n}")
        print("  page cache: warm. The checkpoint was " + ("just written" if build_s else "reused")
              + " and then hashed in full before copy and apply, so both read it from memory; both include fsync "
              "to disk (erasekit fsyncs the rewritten tensors, the undo record and the journal). "
              "Dropping the cache needs root, so no cold-cache figure is given.")
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        print(f"  machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, {mem_gib:.1f} GiB RAM; "
              f"python {platform.python_version()}, torch {torch.__version__} (threads: {torch.get_num_threads()}), numpy {np.__version__}, "
              f"erasekit {erasekit.__version__}")
        busy = max(x.other_cpu for x in rounds)
        timed = max(x.copy_s + x.apply_s + x.revert_s for x in rounds)
        print(f"  other processes: used up to {busy:.2f} CPU-s during a round's {timed:.1f} s of timed sections"
              + ("  -- WARNING: the machine was busy, figures are skewed"
                 + (f" (apply suffers most: torch runs {torch.get_num_threads()} threads; try --torch-threads 1)"
                    if torch.get_num_threads() > 1 else "")
                 if busy > 0.1 * timed else " (machine quiet)")
              + f"; load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end")
        explicit = ["--size-gb", f"{size_gb:g}", "--layers", args.layers, "--patch-dtype", args.patch_dtype,
                    "--seed", str(args.seed)]
        if args.rank:
            explicit += ["--rank", str(args.rank)]
        explicit += ["--repeat", str(args.repeat)]
        if args.workdir.resolve() != DEFAULT_WORKDIR:
            explicit += ["--workdir", str(args.workdir)]
        if args.torch_threads:
            explicit += ["--torch-threads", str(args.torch_threads)]
        if args.keep:
            explicit += ["--keep"]
        print(f"  command:   {shlex.join(['python', 'bench/apply_inplace.py', *sys.argv[1:]])}")
        print(f"  reproduce: cd {shlex.quote(str(REPO))} && . .venv/bin/activate && "
              f"{shlex.join(['python', 'bench/apply_inplace.py', *explicit])}")
        if not ok:
            print("\nFAIL: the file after revert is not bit-identical to the file before apply", file=sys.stderr)
        return 0 if ok else 1
    finally:
        copy_path.unlink(missing_ok=True)
        for p in (base_small, edited_small):
            p.unlink(missing_ok=True)
            p.with_name(p.name + ".partial").unlink(missing_ok=True)
        if args.keep:
            print(f"  kept: {big} and {patch_path}")
        else:
            remove_checkpoint(big)
            big.with_name(big.name + ".partial").unlink(missing_ok=True)
            patch_path.unlink(missing_ok=True)
            if not ok:
                print("  (files deleted; pass --keep to keep them for inspection)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
