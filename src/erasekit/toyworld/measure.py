"""Measure a toy-world model: generate images for prompts and let the judge say what they show.

    python -m erasekit.toyworld.measure [--model DIR|toy-sd|toy-sdxl|toy-flux] [--judge FILE] [--n 16] [--seed 1000] [--set full]
        [--ablate pooled|tokens]

Prompt sets: ``full`` (every shape x colour x pattern, 75 prompts; shape, colour and pattern are all
scored), ``quick`` (15 full prompts that cover every shape, colour and pattern), ``partial``
(single-attribute prompts such as "a circle", "a red object", "a striped object"; only the named
attribute is scored). Sampling: the model's scheduler (DDIM for the SD toys), 25 steps, guidance 7.5, 32x32, one
seeded generator per image (image ``i`` uses seed ``seed + i``), so results do not depend on the batch size.

A FLUX.1-family model (a toy from ``train --family flux``) is sampled as it was trained (:func:`flux_sampling`): its
T5 prompts padded to its ``tokenizer_2``'s ``model_max_length`` (where below FluxPipeline's 512), and, without a
guidance embedding, with real classifier-free guidance (``true_cfg_scale``, the empty prompt as the negative one);
with one, ``guidance`` goes to the guidance embedding as FluxPipeline's ``guidance_scale``.

``--ablate`` (SDXL- and FLUX.1-family models) measures what one of the two paths by which a prompt reaches the
denoiser carries alone: ``pooled`` replaces every prompt's pooled embedding (SDXL: te2's; FLUX.1: CLIP's; added to
the time embedding) by the empty prompt's and keeps its token states; ``tokens`` replaces its token states (what the
denoiser attends to; FLUX.1: T5's) and keeps its pooled embedding. The unconditional branch is the empty prompt's, as
without ablation.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ErasekitError
from ..judging.sampling import render_batch
from . import captions as cap
from . import render as rd

PromptSpec = tuple[str, dict[str, str]]
ABLATIONS = ("pooled", "tokens")


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
    pipe,
    prompts: list[str],
    seed: int,
    steps: int = 25,
    guidance: float = 7.5,
    batch: int = 200,
    ablate: str | None = None,
) -> np.ndarray:
    """uint8 images [len(prompts), 32, 32, 3]; image i is drawn from ``torch.Generator().manual_seed(seed + i)``.
    ``ablate``: ``pooled`` or ``tokens`` (see the module docstring)."""
    if ablate is not None or is_flux(pipe):
        return _generate_direct(pipe, prompts, seed, steps, guidance, batch, ablate)
    images = render_batch(
        pipe, prompts, [seed + i for i in range(len(prompts))], steps=steps, guidance=guidance, batch_size=batch
    )
    return np.stack([np.asarray(im) for im in images])


def is_flux(pipe) -> bool:
    """Whether ``pipe`` is a FLUX.1-family pipeline."""
    from ..families import of_pipeline

    family = of_pipeline(pipe)
    return family is not None and family.name == "flux"


def flux_sampling(pipe, guidance: float) -> dict:
    """The keyword arguments, besides the prompts and ``guidance_scale``, that sample a FLUX.1 pipeline as its toy
    was trained: T5 prompts padded to ``tokenizer_2.model_max_length`` (at most FluxPipeline's 512), and, where the
    transformer has no guidance embedding (which ``guidance_scale`` sets), ``guidance`` as real classifier-free
    guidance (``true_cfg_scale``; the negative prompts are the caller's)."""
    kwargs: dict = {"max_sequence_length": min(512, int(pipe.tokenizer_2.model_max_length))}
    return kwargs if pipe.transformer.config.guidance_embeds else kwargs | {"true_cfg_scale": guidance}


def ablated_embeddings(pipe, prompts: list[str], ablate: str) -> dict[str, torch.Tensor]:
    """An SDXL or FLUX.1 pipeline's conditioning of ``prompts`` with one path made the empty prompt's (``pooled``: the
    pooled embedding; ``tokens``: the token states), and the empty prompt's for the unconditional branch, as the
    keyword arguments of the pipeline's call."""
    if ablate not in ABLATIONS:
        raise ErasekitError(f"unknown ablation {ablate!r}", f"choose {' or '.join(ABLATIONS)}")
    if getattr(pipe, "text_encoder_2", None) is None:
        raise ErasekitError(
            f"ablating the {ablate} path needs an SDXL-family or FLUX.1-family model (token states and a pooled embedding)",
            "measure an SDXL or FLUX.1 pipeline, e.g. --model toy-sdxl, or leave out --ablate",
        )
    with torch.no_grad():
        if is_flux(pipe):
            length = flux_sampling(pipe, 1.0)["max_sequence_length"]
            tokens, pooled, _ = pipe.encode_prompt([*prompts, ""], None, device=pipe.device, max_sequence_length=length)
        else:
            tokens, _, pooled, _ = pipe.encode_prompt(
                [*prompts, ""], device=pipe.device, do_classifier_free_guidance=False
            )
    n = len(prompts)
    empty_tokens, empty_pooled = tokens[-1:].repeat(n, 1, 1), pooled[-1:].repeat(n, 1)
    tokens, pooled = tokens[:-1], pooled[:-1]
    return {
        "prompt_embeds": empty_tokens if ablate == "tokens" else tokens,
        "pooled_prompt_embeds": empty_pooled if ablate == "pooled" else pooled,
        "negative_prompt_embeds": empty_tokens,
        "negative_pooled_prompt_embeds": empty_pooled,
    }


def _generate_direct(
    pipe, prompts: list[str], seed: int, steps: int, guidance: float, batch: int, ablate: str | None
) -> np.ndarray:
    """:func:`generate` by calling the pipeline itself: with one path ablated, or a FLUX.1 pipeline's sampling."""
    from ..judging.sampling import native_size

    size = native_size(pipe)
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        text: dict[str, Any]
        if ablate:
            text = ablated_embeddings(pipe, chunk, ablate)
        else:  # FLUX.1: the unconditional branch (of real guidance) is the empty prompt's
            text = {"prompt": chunk, "negative_prompt": [""] * len(chunk)}
        if is_flux(pipe):
            text |= flux_sampling(pipe, guidance)
        images += pipe(
            **text,
            generator=[torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))],
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
        ).images
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
    ablate: str | None = None,
) -> dict:
    from ..checkpoints.pipeline import load_pipeline
    from . import builtin_model_path
    from .judge import HEADS, accuracy, judge, load_judge

    specs = globals()["prompt_set"](prompt_set)
    pipe, _ = load_pipeline(model or builtin_model_path())
    jm = load_judge(judge_path)
    prompts = [p for p, _ in specs for _ in range(n)]
    t = time.time()
    images = generate(pipe, prompts, seed, steps, guidance, ablate=ablate)
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
            **({"ablate": ablate} if ablate else {}),
        }
    )
    if log:
        log(f"generation ({prompt_set}, n={n}): {summary}")
    return {"summary": summary, "per_prompt": per_prompt, "images": images}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m erasekit.toyworld.measure", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help="pipeline folder (SD, SDXL or FLUX.1), or toy-sd / toy-sdxl / toy-flux (default: the shipped toy-sd)",
    )
    ap.add_argument("--judge", type=Path, default=None, help="judge weights (default: the shipped judge)")
    ap.add_argument("--n", type=int, default=16, help="images per prompt")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--set", default="full", choices=("full", "quick", "partial"))
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", type=Path, default=None, help="save a PNG grid of the images")
    ap.add_argument("--json", type=Path, default=None, help="write the summary and per-prompt table as JSON")
    ap.add_argument(
        "--ablate",
        choices=ABLATIONS,
        default=None,
        help="SDXL, FLUX.1: the path made the empty prompt's (module docstring)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        res = evaluate(
            args.model, args.judge, args.n, args.seed, args.set, args.steps, args.guidance, ablate=args.ablate
        )
    except ErasekitError as e:
        raise SystemExit(f"error: {e}") from None
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
