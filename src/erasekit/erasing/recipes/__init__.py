"""Erase recipes: what the loop optimizes each step, what it holds in place, and when it stops.

The loop (:func:`erasekit.erasing.unlearn.erase`) draws a batch, encodes the step's prompts together with the recipe's own
(one text-encoder pass), runs the UNet on the batch, and asks the recipe for the step's :class:`Objective`: the
term that erases and the term that holds other prompts in place. It minimises their sum with Adam, or, with
``--surgery``, first removes from the erasing term's gradient what conflicts with the holding term's (see
:mod:`erasekit.erasing.surgery`). Then the recipe may update state of its own (``after_step``) and say whether to stop.

A recipe is one module here with a class that follows :class:`Recipe`; add it to ``RECIPES`` and to
``EraseConfig.recipe``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ...format.erase_config import EraseConfig


@dataclass
class Step:
    """What one step computed: the UNet's prediction for the batch (with gradients into the text encoders), the
    batch's prompts, and the conditioning of the recipe's own ``step_prompts`` (hidden states, SDXL's added
    conditioning or None)."""

    prediction: Any  # erasekit.erasing.denoising.Prediction
    prompts: list[str]
    conditioning: tuple[Any, dict[str, Any] | None]


@dataclass
class Objective:
    """``erase``: the term whose minimum erases (None: no text-encoder update this step); ``hold``: the term that
    holds other prompts in place (None: nothing held). The loop minimises ``erase + hold``; ``hold_counts=False``:
    only ``erase``, and ``hold`` serves just as surgery's direction to keep clear of."""

    erase: Any
    hold: Any = None
    hold_counts: bool = True


class Recipe(Protocol):
    def prepare(self, encode: Any, prompts: list[str]) -> None:
        """Before the first step, with the original weights: ``encode(prompts)`` gives their conditioning
        (``(hidden states, SDXL's added conditioning or None)``); ``prompts``: every prompt a step can draw."""

    def step_prompts(self, gen: Any) -> list[str]:
        """Prompts to encode with the step's own (drawn with ``gen`` after the step's draws)."""

    def objective(self, step: Step) -> Objective:
        """The step's objective."""

    def after_step(self, step: Step) -> None:
        """After the text encoders' update (e.g. a discriminator's own step)."""

    def should_stop(self, losses: list[float]) -> bool:
        """After each step: whether the erase is done."""


def make_recipe(config: EraseConfig, concepts: list[str], device: Any) -> Recipe:
    from .anchored import Anchored
    from .doco import DoCo
    from .paper import Paper

    recipes: dict[str, Any] = {"paper": Paper, "anchored": Anchored, "doco": DoCo}
    return recipes[config.recipe](config, concepts, device)
