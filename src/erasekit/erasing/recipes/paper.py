"""The published recipe (Fuchi & Takagi, BMVC 2024): gradient ascent on the denoising loss, nothing held, every
step run. With ``--surgery``, the ascent's gradient loses its components that would move the anchor prompts (see
:mod:`.holding`), but nothing pulls them back."""

from __future__ import annotations

from typing import Any

from ...format.erase_config import EraseConfig
from . import Objective, Step
from .holding import Holding


class Paper:
    def __init__(self, config: EraseConfig, concepts: list[str], device: Any) -> None:
        self.holding = Holding(config, concepts, device) if config.surgery else None

    def prepare(self, encode: Any, prompts: list[str]) -> None:
        if self.holding:
            self.holding.prepare(encode)

    def step_prompts(self, gen: Any) -> list[str]:
        return self.holding.step_prompts(gen) if self.holding else []

    def objective(self, step: Step) -> Objective:
        ascent = -step.prediction.loss  # gradient *ascent* on the denoising loss
        if self.holding is None:
            return Objective(ascent)
        return Objective(ascent, self.holding.penalty(step.conditioning), hold_counts=False)

    def after_step(self, step: Step) -> None:
        pass

    def should_stop(self, losses: list[float]) -> bool:
        return False
