"""Holding other prompts in place: the penalty on how far the text encoders' outputs for anchor prompts (the empty
prompt, everyday captions or the model's own list, ``--keep`` concepts, the concept's stand-ins) move from where
they were. The anchored and doco recipes add it to their objective; with ``--surgery``, every recipe projects its
erasing gradient off the directions that would move these prompts.

Every output the UNet reads is held (:func:`erasekit.erasing.conditioning.encoder_outputs`: the hidden states, and SDXL's
pooled embedding), each in its own unit: its drift is divided by the *spread* of ~30 everyday captions in it (the
mean squared distance of their original outputs from their mean), so that moving an output as far as everyday
prompts differ costs the same for every output, architecture and list of held prompts (SD1/SD2 hold hidden states
after the final layer norm, SDXL before it, and the pooled embedding has a scale of its own)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ...format.erase_config import GENERIC_ANCHORS, EraseConfig
from ..conditioning import encoder_outputs


def _phrase(words: str) -> Any:
    """A case-insensitive regex matching ``words`` as whole words."""
    return re.compile(rf"(?i)(?<!\w){re.escape(words)}(?!\w)")


def replace_words(prompt: str, words: str, by: str) -> str:
    """``prompt`` with every whole-word ``words`` replaced by ``by``, spaces tidied."""
    return " ".join(_phrase(words).sub(by, prompt).split())


def names(prompt: str, concept: str) -> bool:
    return bool(_phrase(concept).search(prompt))


def anchor_prompts(config: EraseConfig, concepts: Sequence[str]) -> tuple[list[str], list[list[str]], Any, Any]:
    """Prompts whose conditioning is held in place (the empty prompt first unless the list has it elsewhere:
    classifier-free guidance encodes it for every image); for each, the prompts whose mean original conditioning it is
    held at (the prompt itself, or for one naming an erased concept with stand-ins, that prompt with each stand-in
    in the concept's place; the concept in its first four templates is added so); their weights (--keep counts
    ``keep_weight`` times: the anchors naming a --keep concept, and the concept in its first four templates); and the
    weights they would have without --keep (the kept concept's templates 0), which the penalty is normalised by.
    An anchor that names an erased concept without a stand-in (or names only part of a concept of several words)
    is dropped: holding it would fight the erasure."""
    import torch

    erased = [c.lower() for c in concepts]
    stand_ins = {k.lower(): v for k, v in config.stand_ins.items()}
    held: list[tuple[str, list[str], float, float]] = []  # (prompt, held at, weight, weight without --keep)
    listed = list(config.anchor_prompts if config.anchor_prompts is not None else GENERIC_ANCHORS)
    for p in [""] * ("" not in listed) + listed:  # the empty prompt always: guidance's unconditional branch reads it
        words = set(p.lower().replace(",", " ").split())
        named = [c for c in erased if set(c.split()) & words]
        if not named:  # an anchor naming a --keep concept counts as much as the concept's own template prompts
            held.append((p, [p], config.keep_weight if any(names(p, k) for k in config.keep) else 1.0, 1.0))
        elif all(c in stand_ins and names(p, c) for c in named):
            alts = [p]
            for c in named:
                alts = [replace_words(a, c, s) for a in alts for s in stand_ins[c]]
            held.append((p, alts, config.stand_in_weight, config.stand_in_weight))
    seen = {h[0] for h in held}  # the concept in its own templates, held at its stand-ins in the same templates
    held += [
        (
            t.format(c),
            [replace_words(t.format(c), c, s) for s in stand_ins[c.lower()]],
            config.stand_in_weight,
            config.stand_in_weight,
        )
        for c in concepts
        if c.lower() in stand_ins
        for t in config.templates_for(c)[:4]
        if t.format(c) not in seen
    ]
    held += [
        (p, [p], config.keep_weight, 0.0)
        for k in config.keep
        for p in (t.format(k) for t in config.templates_for(k)[:4])
    ]
    return (
        [h[0] for h in held],
        [h[1] for h in held],
        torch.tensor([h[2] for h in held]),
        torch.tensor([h[3] for h in held]),
    )


class Holding:
    """The held prompts, the conditioning each is held at, and each step's sample of them."""

    def __init__(self, config: EraseConfig, concepts: list[str], device: Any) -> None:
        self.config = config
        self.held, self.references, weights, unkept = anchor_prompts(config, concepts)
        self.weights, self.unkept = weights.to(device), unkept.to(device)
        self.chosen: list[int] = []

    def prepare(self, encode: Any) -> None:
        """Per output, what each held prompt is held at (the mean over its reference prompts, original weights),
        and the output's unit of drift: the spread of everyday captions (:data:`GENERIC_ANCHORS`) in it, the same
        for every erase of a model whatever prompts it holds."""
        import torch

        with torch.no_grad():
            flat = [r for refs in self.references for r in refs]
            outputs = encoder_outputs(encode(flat + list(GENERIC_ANCHORS)))
            sizes = [len(r) for r in self.references]
            self.targets = {
                name: torch.stack([o.detach().mean(0) for o in out[: len(flat)].split(sizes)])
                for name, out in outputs.items()
            }
            self.units = {name: _spread(out[len(flat) :].detach()) for name, out in outputs.items()}

    def step_prompts(self, gen: Any) -> list[str]:
        import torch

        n, k = len(self.held), self.config.anchor_batch
        self.chosen = torch.randperm(n, generator=gen)[:k].tolist() if k else list(range(n))
        empty = self.held.index("")
        if empty not in self.chosen:  # in every step: guidance reads it for every image
            self.chosen.append(empty)
        return [self.held[j] for j in self.chosen]

    def penalty(self, conditioning: tuple[Any, dict[str, Any] | None]) -> Any:
        """``anchor_weight`` x the weighted sum, over the step's held prompts, of their squared drift in each
        output's unit, averaged over the outputs (``conditioning``: the step's own, as the conditioner gives it),
        divided by the sum of the weights they would have without ``--keep``: without it a weighted mean; with it,
        the kept concept's prompts weigh ``keep_weight`` times and the others as much as without it (in a weighted
        mean over all of them the others would weigh less, the more the kept concept weighs)."""
        outputs = encoder_outputs(conditioning)
        drift = sum(self.drift(name, out) for name, out in outputs.items()) / len(outputs)
        return self.config.anchor_weight * (drift * self.weights[self.chosen]).sum() / self.unkept[self.chosen].sum()

    def drift(self, name: str, output: Any) -> Any:
        """Each of the step's held prompts' mean squared drift in output ``name``, in that output's unit."""
        dims = tuple(range(1, output.dim()))
        return ((output - self.targets[name][self.chosen]) ** 2).mean(dim=dims) / self.units[name]


def _spread(outputs: Any) -> Any:
    """The mean squared distance of the rows of ``outputs`` from their mean (per element); 1 where they do not
    differ at all."""
    spread = ((outputs - outputs.mean(0)) ** 2).mean()
    return spread if spread > 0 else spread.new_tensor(1.0)
