"""erasekit: erase a concept from a Stable Diffusion model, shipped as a small revertible patch.

The public API is imported lazily, so ``import erasekit`` (and ``erasekit --help``) never
imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

_API = {
    "load_patch": "erasekit.format.patchfile",
    "save_patch": "erasekit.format.patchfile",
    "Patch": "erasekit.format.patchfile",
    "Manifest": "erasekit.format.patchfile",
    "apply_patch": "erasekit.checkpoints.memory",
    "revert_patch": "erasekit.checkpoints.memory",
    "apply_to_checkpoint": "erasekit.checkpoints.apply",
    "revert_from_checkpoint": "erasekit.checkpoints.apply",
    "detect": "erasekit.checkpoints.layouts",
    "inspect_path": "erasekit.checkpoints.inspect",
    "diff_paths": "erasekit.checkpoints.diff",
    "erase": "erasekit.erasing.unlearn",
    "erase_model": "erasekit.erasing.erase_job",
    "EraseConfig": "erasekit.format.erase_config",
    "EraseReport": "erasekit.erasing.unlearn",
    "generate": "erasekit.judging.sampling",
    "generate_model": "erasekit.judging.sampling",
    "GenerateConfig": "erasekit.judging.sampling",
    "evaluate_model": "erasekit.judging.evaluate",
    "EvalConfig": "erasekit.judging.evaluate",
    "load_pipeline": "erasekit.checkpoints.pipeline",
}

if TYPE_CHECKING:  # the names __getattr__ gives, for type checkers (X as X: re-exported)
    from .checkpoints.apply import apply_to_checkpoint as apply_to_checkpoint
    from .checkpoints.apply import revert_from_checkpoint as revert_from_checkpoint
    from .checkpoints.diff import diff_paths as diff_paths
    from .checkpoints.inspect import inspect_path as inspect_path
    from .checkpoints.layouts import detect as detect
    from .checkpoints.memory import apply_patch as apply_patch
    from .checkpoints.memory import revert_patch as revert_patch
    from .checkpoints.pipeline import load_pipeline as load_pipeline
    from .erasing.erase_job import erase_model as erase_model
    from .erasing.unlearn import EraseReport as EraseReport
    from .erasing.unlearn import erase as erase
    from .format.erase_config import EraseConfig as EraseConfig
    from .format.patchfile import Manifest as Manifest
    from .format.patchfile import Patch as Patch
    from .format.patchfile import load_patch as load_patch
    from .format.patchfile import save_patch as save_patch
    from .judging.evaluate import EvalConfig as EvalConfig
    from .judging.evaluate import evaluate_model as evaluate_model
    from .judging.sampling import GenerateConfig as GenerateConfig
    from .judging.sampling import generate as generate
    from .judging.sampling import generate_model as generate_model

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'erasekit' has no attribute {name!r}")
