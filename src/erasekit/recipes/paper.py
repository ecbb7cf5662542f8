"""The published recipe (Fuchi & Takagi, BMVC 2024): gradient ascent on the denoising loss, nothing held, every
step run."""

from __future__ import annotations

from typing import Any

from ..erase_config import EraseConfig


class Paper:
    def __init__(self, config: EraseConfig, templates: list[str], concepts: list[str], device: Any) -> None:
        pass

    def prepare(self, encode: Any) -> None:
        pass

    def step_prompts(self, gen: Any) -> list[str]:
        return []

    def objective(self, loss: Any, conditioning: Any) -> Any:
        return -loss  # gradient *ascent* on the denoising loss

    def should_stop(self, losses: list[float]) -> bool:
        return False
