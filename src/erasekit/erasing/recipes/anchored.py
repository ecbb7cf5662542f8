"""The anchored recipe: ascent on the denoising loss plus a penalty that holds the text encoders' output for other
prompts where it was (see :mod:`.holding`), and an early stop when the erasure tips."""

from __future__ import annotations

from typing import Any

from ...format.erase_config import EraseConfig
from . import Objective, Step
from .holding import Holding


def tipped(losses: list[float], config: EraseConfig) -> bool:
    """The erasure "tips": the loss, flat for a while, jumps. Stop when the mean of the last ``stop_window``
    losses exceeds ``stop_ratio`` times the mean of the first ``stop_window``."""
    w = config.stop_window
    if config.stop_ratio is None or len(losses) < 2 * w:
        return False
    return sum(losses[-w:]) / w > config.stop_ratio * sum(losses[:w]) / w


class Anchored:
    def __init__(self, config: EraseConfig, concepts: list[str], device: Any) -> None:
        self.config = config
        self.holding = Holding(config, concepts, device)

    def prepare(self, encode: Any, prompts: list[str]) -> None:
        self.holding.prepare(encode)

    def step_prompts(self, gen: Any) -> list[str]:
        return self.holding.step_prompts(gen)

    def objective(self, step: Step) -> Objective:
        return Objective(-step.prediction.loss, self.holding.penalty(step.conditioning))

    def after_step(self, step: Step) -> None:
        pass

    def should_stop(self, losses: list[float]) -> bool:
        return tipped(losses, self.config)
