"""Measure a toy-world model: generate images for prompts and let the judge say what they show.

    python -m erasekit.toyworld.measure [--model DIR] [--judge FILE] [--n 16] [--seed 1000] [--set full]

Prompt sets: ``full`` (every shape x colour x pattern, 75 prompts; shape, colour and pattern are all
scored), ``quick`` (15 full prompts that cover every shape, colour and pattern), ``partial``
(single-attribute prompts such as "a circle", "a red object", "a striped object"; only the named
attribute is scored). Sampling: DDIM, 25 steps, guidance 7.5, 32x32, one seeded generator per image
(image ``i`` uses seed ``seed + i``), so results do not depend on the batch size.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..judging.sampling import render_batch
from . import captions as cap
from . import render as rd

PromptSpec = tuple[str, dict[str, str]]


def prompt_set(name: str) -> list[PromptSpec]:
    if name == "full":
        return cap.full_prompts()
    if name == "quick":
        out = []
        for i, s in enumerate(rd.SHAPES):
            for j, p in enumerate(rd.PATTERNS):
                c = tuple(rd.COLOURS)[(i + 2 * j) % len(rd.COLOURS)]
                out.append((cap.prompt_for(s, c, p), {"shape": s, "colour": c, "pattern": p}))
        return out
    if name == "partial":
        return (
            [(cap.prompt_for(shape=s), {"shape": s}) for s in rd.SHAPES]
            + [(cap.prompt_for(colour=c), {"colour": c}) for c in rd.COLOURS]
            + [(cap.prompt_for(pattern=p), {"pattern": p}) for p in rd.PATTERNS]
        )
    raise ValueError(f"unknown prompt set {name!r}")


def generate(
    pipe, prompts: list[str], seed: int, steps: int = 25, guidance: float = 7.5, batch: int = 200
) -> np.ndarray:
    """uint8 images [len(prompts), 32, 32, 3]; image i is drawn from ``torch.Generator().manual_seed(seed + i)``."""
    images = render_batch(
        pipe, prompts, [seed + i for i in range(len(prompts))], steps=steps, guidance=guidance, batch_size=batch
    )
    return np.stack([np.asarray(im) for im in images])


def evaluate(
    model: str | Path | None = None,
    judge_path: str | Path | None = None,
    n: int = 16,
    seed: int = 1000,
    prompt_set: str = "full",
    steps: int = 25,
    guidance: float = 7.5,
    log: Callable[[str], None] | None = None,
) -> dict:
    from ..checkpoints.pipeline import load_pipeline
    from . import builtin_model_path
    from .judge import HEADS, accuracy, judge, load_judge

    specs = globals()["prompt_set"](prompt_set)
    pipe, _ = load_pipeline(model or builtin_model_path())
    jm = load_judge(judge_path)
    prompts = [p for p, _ in specs for _ in range(n)]
    t = time.time()
    images = generate(pipe, prompts, seed, steps, guidance)
    secs = time.time() - t
    labels = judge(images, model=jm)
    truths = [t for _, t in specs for _ in range(n)]
    per_prompt = [
        {"prompt": p, **{k: round(accuracy(labels[j * n : (j + 1) * n], [truth] * n, k), 3) for k in truth}}
        for j, (p, truth) in enumerate(specs)
    ]
    summary: dict[str, float | int | str] = {
        k: round(accuracy(labels, truths, k), 4) for k in HEADS if any(k in t for t in truths)
    }
    summary.update(
        {
            "prompts": len(specs),
            "n_per_prompt": n,
            "images": len(prompts),
            "seconds": round(secs, 1),
            "steps": steps,
            "guidance": guidance,
            "seed": seed,
            "set": prompt_set,
        }
    )
    if log:
        log(f"generation ({prompt_set}, n={n}): {summary}")
    return {"summary": summary, "per_prompt": per_prompt, "images": images}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m erasekit.toyworld.measure", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="pipeline folder (default: the shipped model)")
    ap.add_argument("--judge", type=Path, default=None, help="judge weights (default: the shipped judge)")
    ap.add_argument("--n", type=int, default=16, help="images per prompt")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--set", default="full", choices=("full", "quick", "partial"))
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", type=Path, default=None, help="save a PNG grid of the images")
    ap.add_argument("--json", type=Path, default=None, help="write the summary and per-prompt table as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = evaluate(args.model, args.judge, args.n, args.seed, args.set, args.steps, args.guidance)
    for row in res["per_prompt"]:
        print(json.dumps(row))
    print(json.dumps(res["summary"]))
    if args.grid:
        from PIL import Image

        rd.grid([Image.fromarray(im) for im in res["images"]], cols=args.n).save(args.grid)
    if args.json:
        args.json.write_text(json.dumps({"summary": res["summary"], "per_prompt": res["per_prompt"]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
