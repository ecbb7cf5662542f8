"""What the built-in toy world can be asked about: its concepts by attribute, an image of a concept (for erase),
and the prompts `erasekit eval` judges, paraphrases included."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ErasekitError
from .captions import prompt_for
from .render import ATTRIBUTES, render

# Wordings of a concept that neither erase's templates (erase_config.OBJECT_TEMPLATES) nor the world's training
# captions (captions.CAPTION_MIX, PREFIXES) use, and that the unpatched built-in model still draws as the concept
# (before-rates measured in docs/toyworld.md, "Paraphrases"; every one was kept only at >= 70% for every value of
# its attribute). `erasekit eval` reports the target under them as its robustness; "{}" is the concept.
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "shape": ("one {}", "{}", "a {} shape", "a drawing of one {}"),
    "colour": ("something {}", "a {} thing", "{}", "an object in {}"),
    "pattern": ("something {}", "a {} thing", "{}", "a {} figure"),
}


def attribute_of(concept: str) -> str:
    for attr, values in ATTRIBUTES.items():
        if concept in values:
            return attr
    known = "; ".join(f"{a}s: {', '.join(v)}" for a, v in ATTRIBUTES.items())
    raise ErasekitError(
        f"the built-in toy world has no concept {concept!r}",
        f"name one it draws and its judge knows ({known}), or give images and a model for others",
    )


def render_concept(concept: str, seed: int) -> tuple[Any, str]:
    """A rendered image showing ``concept`` (the other attributes drawn at random, seeded) and its caption."""
    rng = np.random.default_rng(seed)
    attrs = {a: str(rng.choice(v)) for a, v in ATTRIBUTES.items()}
    attrs[attribute_of(concept)] = concept
    return render(attrs["shape"], attrs["colour"], attrs["pattern"], rng), prompt_for(**attrs)


def paraphrases_of(concept: str) -> list[str]:
    """The built-in paraphrase wordings of a concept's attribute (``{}`` where the concept goes)."""
    return list(PARAPHRASES[attribute_of(concept)])


def truth_of(prompt: str) -> dict[str, str]:
    """The attributes a prompt names, read from its words."""
    words = prompt.lower().replace(",", " ").split()
    return {attr: v for attr, values in ATTRIBUTES.items() for v in values if v in words}


def eval_prompts(attribute: str, n: int) -> list[tuple[str, dict[str, str]]]:
    """For every concept of ``attribute``: ``n`` prompts naming it, the other attributes cycling evenly."""
    others = [a for a in ATTRIBUTES if a != attribute]
    out = []
    for value in ATTRIBUTES[attribute]:
        for i in range(n):
            a0 = ATTRIBUTES[others[0]][i % len(ATTRIBUTES[others[0]])]
            a1 = ATTRIBUTES[others[1]][(i // len(ATTRIBUTES[others[0]])) % len(ATTRIBUTES[others[1]])]
            truth = {attribute: value, others[0]: a0, others[1]: a1}
            out.append((prompt_for(**truth), truth))
    return out
