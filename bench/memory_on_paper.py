#!/usr/bin/env python
"""GPU memory of a full-size FLUX.1-dev or SD3.5-large erase, on paper: per way of training the text encoders'
FFN, the gigabytes it needs and whether it fits a 24, 48 or 80 GB GPU (issue 21, item 5).

Every figure is arithmetic on parameter counts and the assumptions below, printed with the table; none is
measured. `bench/gpu_suite.py`'s FLUX/SD3 rows replace them with measurements where a GPU is lent.

    python bench/memory_on_paper.py [--resolution 1024] [--prompts 18] [--rank 16] [--json]

Assumptions (each a flag or a constant here):
- Frozen weights in bf16 (2 bytes a parameter): the denoiser, and every text-encoder tensor that is not trained.
  The VAE encodes the few training images once, before the loop (erasekit caches their latents), and is then off
  the GPU.
- A trained tensor: float32 weight, float32 gradient and Adam's two float32 moments, 16 bytes a parameter; with
  8-bit Adam (bitsandbytes' blockwise states) 10 bytes. Low-rank training (``train: factors``, erasekit's default
  where a T5 trains) trains factors ``up`` (out x r) and ``down`` (r x in) per FFN matrix, and CLIP's FFN biases,
  at 16 bytes a parameter, and keeps every encoder weight frozen: in bf16 (2 bytes a parameter), as ``erasekit
  erase`` holds them where the loop computes in bf16 (``--dtype auto`` on a GPU), or in float32 as it does with
  ``--dtype fp32`` (4 bytes; the "encoders fp32" rows).
- Activations, with gradient checkpointing per block in the denoiser and in the trained encoders (their inputs
  stored in bf16, one block recomputed at a time, about 20 hidden-widths per token): the denoiser for one image
  (its latent tokens plus the text tokens), each encoder for ``--prompts`` prompts a step (the concept's and the
  held ones: anchored holds 16 anchors, plus 2 of the concept's), T5 at the family's sequence length (FLUX 512,
  SD3 256), CLIP at 77.
- 10% of the GPU for the CUDA context, the allocator's fragmentation and cuBLAS workspaces: "fits" means the total
  is at most 90% of the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

GB = 1e9
BF16, FP32, TRAINED, TRAINED_8BIT = 2, 4, 16, 10  # bytes a parameter (see the docstring)
GPUS = (24, 48, 80)
USABLE = 0.9


@dataclass(frozen=True)
class EncoderSize:
    name: str
    params: int  # the whole encoder
    ffn: tuple[tuple[int, int], ...]  # (out, in) of every FFN matrix
    ffn_bias: int  # FFN bias parameters (trained dense with the weights)
    hidden: int
    layers: int
    tokens: int  # per prompt, as the family pads it

    @property
    def ffn_params(self) -> int:
        return sum(o * i for o, i in self.ffn) + self.ffn_bias


def t5_xxl(tokens: int) -> EncoderSize:
    d, ff, blocks, vocab = 4096, 10240, 24, 32128
    per_block = 4 * d * d + 3 * d * ff + 2 * d
    params = vocab * d + blocks * per_block + 32 * 64 + d
    return EncoderSize("T5-XXL", params, ((ff, d), (ff, d), (d, ff)) * blocks, 0, d, blocks, tokens)


def clip(name: str, params: int, hidden: int, ff: int, layers: int) -> EncoderSize:
    return EncoderSize(name, params, ((ff, hidden), (hidden, ff)) * layers, (ff + hidden) * layers, hidden, layers, 77)


CLIP_L = clip("CLIP-L", 123_060_480, 768, 3072, 12)
CLIP_G = clip("CLIP-G", 694_659_840, 1280, 5120, 32)


@dataclass(frozen=True)
class Model:
    name: str
    denoiser_params: float
    hidden: int  # the denoiser's width
    blocks: int  # its transformer blocks
    patch: int  # pixels per latent token side (VAE 8 x patch 2)
    encoders: tuple[EncoderSize, ...]

    def denoiser_tokens(self, resolution: int) -> int:
        return (resolution // self.patch) ** 2 + max(e.tokens for e in self.encoders)


MODELS = (
    Model("FLUX.1-dev", 11.90e9, 3072, 19 + 38, 16, (CLIP_L, t5_xxl(512))),
    Model("SD3.5-large", 8.06e9, 2432, 38, 16, (CLIP_L, CLIP_G, t5_xxl(256))),
)


def activations(hidden: int, blocks: int, tokens: int, rows: int) -> float:
    """Checkpointed activations: each block's input stored (bf16), one block's intermediates recomputed."""
    return rows * tokens * hidden * BF16 * (blocks + 20)


def lowrank_params(e: EncoderSize, rank: int) -> int:
    return sum(rank * (o + i) for o, i in e.ffn)


def encoder_bytes(e: EncoderSize, option: str, rank: int) -> float:
    """The encoder's weights and training state under ``option`` (low-rank: its frozen weights in bf16, or in
    float32 where ``option`` says "encoders fp32")."""
    frozen_rest = (e.params - e.ffn_params) * BF16
    if option == "dense":
        return frozen_rest + e.ffn_params * TRAINED
    if option == "dense, 8-bit Adam":
        return frozen_rest + e.ffn_params * TRAINED_8BIT
    if option == "a third of the layers":
        share = e.ffn_params // 3
        return frozen_rest + share * TRAINED + (e.ffn_params - share) * BF16
    frozen = FP32 if "encoders fp32" in option else BF16
    return e.params * frozen + (lowrank_params(e, rank) + e.ffn_bias) * TRAINED  # low-rank


OPTIONS = (
    ("dense", "bf16"),
    ("dense, 8-bit Adam", "bf16"),
    ("a third of the layers", "bf16"),
    ("low-rank", "bf16"),
    ("low-rank", "fp8"),
    ("low-rank", "offloaded"),
    ("low-rank, encoders fp32", "bf16"),
    ("low-rank, encoders fp32", "offloaded"),
)


def denoiser_bytes(m: Model, weights: str) -> float:
    if weights == "fp8":
        return m.denoiser_params * 1
    if weights == "offloaded":  # streamed block by block from CPU memory: two blocks resident
        return 2 * m.denoiser_params / m.blocks * BF16
    return m.denoiser_params * BF16


def estimate(m: Model, option: str, weights: str, resolution: int, prompts: int, rank: int) -> dict[str, float]:
    enc = sum(encoder_bytes(e, option, rank) for e in m.encoders)
    act = activations(m.hidden, m.blocks, m.denoiser_tokens(resolution), 1)
    act += sum(activations(e.hidden, e.layers, e.tokens, prompts) for e in m.encoders)
    parts = {"denoiser": denoiser_bytes(m, weights), "encoders + training state": enc, "activations": act}
    return {k: v / GB for k, v in parts.items()} | {"total": sum(parts.values()) / GB}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=1024, help="training image size in pixels (default 1024)")
    ap.add_argument("--prompts", type=int, default=18, help="prompts through the encoders a step (default 18)")
    ap.add_argument("--rank", type=int, default=16, help="low-rank training's rank (default 16)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = [
        (m.name, option, weights, estimate(m, option, weights, args.resolution, args.prompts, args.rank))
        for m in MODELS
        for option, weights in OPTIONS
    ]
    if args.json:
        print(json.dumps([{"model": a, "ffn": b, "denoiser": c} | d for a, b, c, d in rows], indent=1))
        return 0
    print(
        f"{args.resolution} px, {args.prompts} prompts a step, low-rank r={args.rank}; GB = 1e9 bytes; "
        f"fits: total <= {USABLE:.0%} of the GPU\n"
    )
    print(
        "| model | FFN training | denoiser weights | denoiser | encoders + state | activations | total | "
        + " | ".join(f"{g} GB" for g in GPUS)
        + " |"
    )
    print("|---|---|---|---:|---:|---:|---:|" + "---|" * len(GPUS))
    for name, option, weights, e in rows:
        fits = " | ".join("yes" if e["total"] <= USABLE * g else "no" for g in GPUS)
        print(
            f"| {name} | {option} | {weights} | {e['denoiser']:.1f} | {e['encoders + training state']:.1f} "
            f"| {e['activations']:.1f} | **{e['total']:.1f}** | {fits} |"
        )
    for m in MODELS:
        ffn = sum(e.ffn_params for e in m.encoders)
        print(
            f"\n{m.name}: encoders' FFN {ffn / 1e9:.2f} B parameters; at rank {args.rank}, "
            f"{sum(lowrank_params(e, args.rank) for e in m.encoders) / 1e6:.1f} M"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
