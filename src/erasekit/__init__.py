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

if TYPE_CHECKING:
    from .checkpoints.apply import apply_to_checkpoint, revert_from_checkpoint
    from .checkpoints.memory import apply_patch, revert_patch
    from .checkpoints.diff import diff_paths
    from .judging.evaluate import EvalConfig, evaluate_model
    from .checkpoints.pipeline import load_pipeline
    from .judging.sampling import GenerateConfig, generate, generate_model
    from .format.erase_config import EraseConfig
    from .erasing.erase_job import erase_model
    from .erasing.unlearn import EraseReport, erase
    from .checkpoints.inspect import inspect_path
    from .checkpoints.layouts import detect
    from .format.patchfile import Manifest, Patch, load_patch, save_patch

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'erasekit' has no attribute {name!r}")
