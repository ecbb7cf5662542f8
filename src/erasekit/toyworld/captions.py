"""Captions for the toy world, and the prompts used to evaluate a model trained on it.

Training captions name the attributes of the image in the fixed order colour, pattern, shape
("a red striped circle"). The mix (see ``CAPTION_MIX``): 10% empty (for classifier-free guidance),
55% full captions, 35% partial ones that leave out one or two attributes ("a red circle",
"a circle", "a red object", "a striped shape"). 15% of the non-empty captions get a short
prefix ("a photo of a red circle") so that the templates erasing methods use are not out of
distribution.

Pure Python (no torch, no numpy needed).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from .render import COLOURS, PATTERNS, SHAPES

NOUNS_WITHOUT_SHAPE = ("object", "shape")
PREFIXES = ("a photo of", "a picture of", "a drawing of", "an image of", "a rendering of")
PREFIX_P = 0.15

# (probability, attributes named) -- sums to 1
CAPTION_MIX: tuple[tuple[float, tuple[str, ...]], ...] = (
    (0.10, ()),
    (0.55, ("colour", "pattern", "shape")),
    (0.10, ("colour", "shape")),
    (0.07, ("shape",)),
    (0.06, ("colour",)),
    (0.04, ("pattern",)),
    (0.04, ("pattern", "shape")),
    (0.04, ("colour", "pattern")),
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def prompt_for(
    shape: str | None = None, colour: str | None = None, pattern: str | None = None, prefix: str | None = None
) -> str:
    """The canonical prompt naming the given attributes: ``prompt_for("circle", "red", "striped")``
    is ``"a red striped circle"``; ``prompt_for(colour="red")`` is ``"a red object"``; with no
    attribute at all it is the empty prompt ``""``."""
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    if colour is not None and colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}")
    if pattern is not None and pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}")
    if shape is None and colour is None and pattern is None:
        return ""
    noun = shape if shape is not None else "object"
    words = [w for w in (colour, pattern, noun) if w is not None]
    text = f"{_article(words[0])} {' '.join(words)}"
    return f"{prefix} {text}" if prefix else text


def caption(attrs: Mapping[str, str], rng: random.Random) -> str:
    """A random training caption for an image with attributes ``attrs`` (keys shape, colour, pattern)."""
    u, acc, named = rng.random(), 0.0, CAPTION_MIX[-1][1]
    for p, names in CAPTION_MIX:
        acc += p
        if u < acc:
            named = names
            break
    if not named:
        return ""
    words = [attrs[k] for k in ("colour", "pattern") if k in named]
    words.append(attrs["shape"] if "shape" in named else rng.choice(NOUNS_WITHOUT_SHAPE))
    text = f"{_article(words[0])} {' '.join(words)}"
    if rng.random() < PREFIX_P:
        text = f"{rng.choice(PREFIXES)} {text}"
    return text


def full_prompts(pattern: str | None = None) -> list[tuple[str, dict[str, str]]]:
    """Every (shape, colour) full prompt, at one pattern (or at every pattern when None)."""
    out = []
    for pat in PATTERNS if pattern is None else (pattern,):
        for s in SHAPES:
            for c in COLOURS:
                out.append((prompt_for(s, c, pat), {"shape": s, "colour": c, "pattern": pat}))
    return out
