"""The anchored recipe: ascent on the denoising loss plus a penalty that holds the text encoders' output for other
prompts (everyday captions or the model's own list, --keep concepts, the concept's stand-ins) where it was, and an
early stop when the erasure tips."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..erase_config import GENERIC_ANCHORS, EraseConfig


def _phrase(words: str) -> Any:
    """A case-insensitive regex matching ``words`` as whole words."""
    return re.compile(rf"(?i)(?<!\w){re.escape(words)}(?!\w)")


def _replace_words(prompt: str, words: str, by: str) -> str:
    """``prompt`` with every whole-word ``words`` replaced by ``by``, spaces tidied."""
    return " ".join(_phrase(words).sub(by, prompt).split())


def anchor_prompts(config: EraseConfig, templates: list[str],
                   concepts: Sequence[str]) -> tuple[list[str], list[list[str]], Any]:
    """Prompts whose conditioning the anchored recipe holds in place; for each, the prompts whose mean original
    conditioning it is held at (the prompt itself, or for one naming an erased concept with stand-ins, that
    prompt with each stand-in in the concept's place; the concept's first templates are added so); and their
    weights (--keep counts more).
    An anchor that names an erased concept without a stand-in (or names only part of a concept of several words)
    is dropped: holding it would fight the erasure."""
    import torch

    erased = [c.lower() for c in concepts]
    stand_ins = {k.lower(): v for k, v in config.stand_ins.items()}
    held: list[tuple[str, list[str], float]] = []
    for p in (config.anchor_prompts if config.anchor_prompts is not None else GENERIC_ANCHORS):
        words = set(p.lower().replace(",", " ").split())
        named = [c for c in erased if set(c.split()) & words]
        if not named:
            held.append((p, [p], 1.0))
        elif all(c in stand_ins and _phrase(c).search(p) for c in named):
            alts = [p]
            for c in named:
                alts = [_replace_words(a, c, s) for a in alts for s in stand_ins[c]]
            held.append((p, alts, config.stand_in_weight))
    seen = {h[0] for h in held}  # the concept in its own templates, held at its stand-ins in the same templates
    held += [(t.format(c), [_replace_words(t.format(c), c, s) for s in stand_ins[c.lower()]], config.stand_in_weight)
             for c in concepts if c.lower() in stand_ins for t in templates[:4] if t.format(c) not in seen]
    held += [(k, [k], config.keep_weight) for k in (t.format(k) for k in config.keep for t in templates[:4])]
    return [h[0] for h in held], [h[1] for h in held], torch.tensor([h[2] for h in held])


def tipped(losses: list[float], config: EraseConfig) -> bool:
    """The erasure "tips": the loss, flat for a while, jumps. Stop when the mean of the last ``stop_window``
    losses exceeds ``stop_ratio`` times the mean of the first ``stop_window``."""
    w = config.stop_window
    if config.stop_ratio is None or len(losses) < 2 * w:
        return False
    return sum(losses[-w:]) / w > config.stop_ratio * sum(losses[:w]) / w


class Anchored:
    def __init__(self, config: EraseConfig, templates: list[str], concepts: list[str], device: Any) -> None:
        self.config = config
        self.held, self.references, weights = anchor_prompts(config, templates, concepts)
        self.weights = weights.to(device)
        self.chosen: list[int] = []

    def prepare(self, encode: Any) -> None:
        """The conditioning each held prompt is held at: the mean over its reference prompts, original weights."""
        import torch

        with torch.no_grad():
            flat = [r for refs in self.references for r in refs]
            conds = encode(flat).detach()
            self.targets = torch.stack([c.mean(0) for c in conds.split([len(r) for r in self.references])])

    def step_prompts(self, gen: Any) -> list[str]:
        import torch

        n, k = len(self.held), self.config.anchor_batch
        self.chosen = torch.randperm(n, generator=gen)[:k].tolist() if k else list(range(n))
        return [self.held[j] for j in self.chosen]

    def objective(self, loss: Any, conditioning: Any) -> Any:
        drift = ((conditioning - self.targets[self.chosen]) ** 2).mean(dim=(1, 2))
        w = self.weights[self.chosen]
        return -loss + self.config.anchor_weight * (drift * w).sum() / w.sum()

    def should_stop(self, losses: list[float]) -> bool:
        return tipped(losses, self.config)
