"""Erase recipes: what the loop optimizes each step, what it holds in place, and when it stops.

The loop (:func:`erasekit.unlearn.erase`) draws a batch, encodes the step's prompts together with the recipe's own
(one text-encoder pass), computes the denoising loss on the batch, and asks the recipe for the objective to
minimise and whether to stop. A recipe is one module here with a class that follows :class:`Recipe`; add it to
``RECIPES`` and to ``EraseConfig.recipe``.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..erase_config import EraseConfig


class Recipe(Protocol):
    def prepare(self, encode: Any) -> None:
        """Before the first step, with the original weights: ``encode(prompts)`` gives their conditioning."""

    def step_prompts(self, gen: Any) -> list[str]:
        """Prompts to encode with the step's own (drawn with ``gen`` after the step's draws)."""

    def objective(self, loss: Any, conditioning: Any) -> Any:
        """What the optimizer minimises, from the step's denoising loss and the conditioning of ``step_prompts``."""

    def should_stop(self, losses: list[float]) -> bool:
        """After each step: whether the erase is done."""


def make_recipe(config: EraseConfig, templates: list[str], concepts: list[str], device: Any) -> Recipe:
    from .anchored import Anchored
    from .paper import Paper

    recipes: dict[str, Any] = {"paper": Paper, "anchored": Anchored}
    return recipes[config.recipe](config, templates, concepts, device)
