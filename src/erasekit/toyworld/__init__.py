"""erasekit's built-in toy world: a procedurally drawn world, a small text-to-image model trained on it
(built from exactly Stable Diffusion's classes), and a judge CNN that reads what an image shows.

* ``render``   -- the world: ``render(shape, colour, pattern, rng)``, ``sample(rng)``, ``SHAPES``, ``COLOURS``, ``PATTERNS``
* ``captions`` -- training captions and ``prompt_for(shape=None, colour=None, pattern=None)``
* ``judge``    -- ``load_judge()``, ``judge(images)`` (imports torch)
* ``train``    -- ``python -m erasekit.toyworld.train --out DIR --seed 0 [--family sd|sdxl|flux]`` (imports torch)
* ``concepts`` -- what ``erasekit eval`` asks about: ``attribute_of``, ``render_concept``, ``eval_prompts``
* ``measure``  -- ``python -m erasekit.toyworld.measure``: a model's accuracy per prompt set (imports torch)

Three models of the world are built in, named for ``--model``: ``toy-sd`` (the default, a StableDiffusionPipeline,
folder ``model/``), ``toy-sdxl`` (a StableDiffusionXLPipeline with two text encoders, folder ``model-sdxl/``) and
``toy-flux`` (a FluxPipeline: CLIP's pooled vector and a small T5, folder ``model-flux/``).

Importing this package does not import torch. The world (render, captions, concepts, judge, tokenizer) imports
only the top-level helpers, so that judging can use it; ``train`` and ``measure`` build and measure the model
with :mod:`erasekit.judging` and :mod:`erasekit.checkpoints`, above them.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputFileError

_HERE = Path(__file__).resolve().parent

# the built-in models by the name --model takes -> their folder next to this file
BUILTIN_MODELS = {"toy-sd": "model", "toy-sdxl": "model-sdxl", "toy-flux": "model-flux"}
DEFAULT_MODEL = "toy-sd"


def builtin_model_path(name: str = DEFAULT_MODEL) -> Path:
    """The folder of a shipped diffusers pipeline: ``toy-sd`` (load with ``StableDiffusionPipeline.from_pretrained``),
    ``toy-sdxl`` (``StableDiffusionXLPipeline.from_pretrained``) or ``toy-flux`` (``FluxPipeline.from_pretrained``;
    sample it with ``max_sequence_length=16`` and real guidance: docs/toyworld-flux.md)."""
    if name not in BUILTIN_MODELS:
        raise InputFileError(f"{name!r} is not a built-in model", f"name one of {', '.join(BUILTIN_MODELS)}")
    return _HERE / BUILTIN_MODELS[name]


def builtin_judge_path() -> Path:
    """The shipped judge weights (safetensors); the judge of both built-in models (they draw the same world)."""
    return _HERE / "judge.safetensors"


__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "builtin_model_path", "builtin_judge_path"]
