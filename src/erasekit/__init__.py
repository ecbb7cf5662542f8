"""erasekit: erase a concept from a Stable Diffusion model, shipped as a small revertible patch.

The public API is imported lazily, so ``import erasekit`` (and ``erasekit --help``) never
imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

_API = {
    "load_patch": "erasekit.patchfile",
    "save_patch": "erasekit.patchfile",
    "Patch": "erasekit.patchfile",
    "Manifest": "erasekit.patchfile",
    "apply_patch": "erasekit.memory",
    "revert_patch": "erasekit.memory",
    "apply_to_checkpoint": "erasekit.apply",
    "revert_from_checkpoint": "erasekit.apply",
    "detect": "erasekit.layouts",
    "inspect_path": "erasekit.inspect",
    "diff_paths": "erasekit.diff",
    "erase": "erasekit.unlearn",
    "erase_model": "erasekit.erase_job",
    "EraseConfig": "erasekit.erase_config",
    "EraseReport": "erasekit.unlearn",
    "generate": "erasekit.sampling",
    "generate_model": "erasekit.sampling",
    "GenerateConfig": "erasekit.sampling",
    "evaluate_model": "erasekit.evaluate",
    "EvalConfig": "erasekit.evaluate",
    "load_pipeline": "erasekit.pipeline",
}

if TYPE_CHECKING:
    from .apply import apply_to_checkpoint, revert_from_checkpoint
    from .memory import apply_patch, revert_patch
    from .diff import diff_paths
    from .evaluate import EvalConfig, evaluate_model
    from .pipeline import load_pipeline
    from .sampling import GenerateConfig, generate, generate_model
    from .erase_config import EraseConfig
    from .erase_job import erase_model
    from .unlearn import EraseReport, erase
    from .inspect import inspect_path
    from .layouts import detect
    from .patchfile import Manifest, Patch, load_patch, save_patch

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'erasekit' has no attribute {name!r}")
