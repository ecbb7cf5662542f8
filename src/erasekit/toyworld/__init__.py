"""erasekit's built-in toy world: a procedurally drawn world, a small text-to-image model trained on it
(built from exactly Stable Diffusion's classes), and a judge CNN that reads what an image shows.

* ``render``   -- the world: ``render(shape, colour, pattern, rng)``, ``sample(rng)``, ``SHAPES``, ``COLOURS``, ``PATTERNS``
* ``captions`` -- training captions and ``prompt_for(shape=None, colour=None, pattern=None)``
* ``judge``    -- ``load_judge()``, ``judge(images)`` (imports torch)
* ``train``    -- ``python -m erasekit.toyworld.train --out DIR --seed 0`` (imports torch)
* ``concepts`` -- what ``erasekit eval`` asks about: ``attribute_of``, ``render_concept``, ``eval_prompts``
* ``measure``  -- ``python -m erasekit.toyworld.measure``: a model's accuracy per prompt set (imports torch)

Importing this package does not import torch. The world (render, captions, concepts, judge, tokenizer) imports
only the top-level helpers, so that judging can use it; ``train`` and ``measure`` build and measure the model
with :mod:`erasekit.judging` and :mod:`erasekit.checkpoints`, above them.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def builtin_model_path() -> Path:
    """The folder of the shipped diffusers pipeline (load with ``StableDiffusionPipeline.from_pretrained(path)``)."""
    return _HERE / "model"


def builtin_judge_path() -> Path:
    """The shipped judge weights (safetensors)."""
    return _HERE / "judge.safetensors"


__all__ = ["builtin_model_path", "builtin_judge_path"]
