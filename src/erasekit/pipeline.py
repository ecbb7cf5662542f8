"""Load a local Stable Diffusion pipeline for erase and generate (never from a hub)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from .errors import ErasekitError, InputFileError, LayoutError
from .layouts import Checkpoint, detect

SUPPORTED = ("sd1", "sd2", "sdxl")
_COMPONENTS = {"sd1": ("unet", "vae", "tokenizer", "scheduler", "text_encoder"),
               "sd2": ("unet", "vae", "tokenizer", "scheduler", "text_encoder"),
               "sdxl": ("unet", "vae", "tokenizer", "tokenizer_2", "scheduler", "text_encoder", "text_encoder_2")}


class UnsupportedModelError(LayoutError):
    """The model is readable but erase/generate do not support its architecture yet."""


def quiet_libraries() -> None:
    """diffusers and transformers log loudly (progress bars, deprecations); erasekit reports for itself."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")


def model_settings(model: str | os.PathLike) -> dict[str, Any]:
    """A model folder's ``erasekit.json``: recommended settings per command (``{"erase": {...}}``) and
    ``"toyworld": true`` for models of the built-in world. Empty for other models and for single files."""
    import json

    path = Path(model) / "erasekit.json"
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LayoutError(f"{path} is not readable JSON ({type(e).__name__})", "repair or delete it") from None
    if not isinstance(obj, dict):
        raise LayoutError(f"{path} is not a JSON object", "repair or delete it")
    return obj


def resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ErasekitError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ErasekitError("--device cuda was asked for but this torch has no CUDA device", "use --device cpu")
    return dev


def load_pipeline(model: str | os.PathLike, *, device: Any = "cpu", torch_dtype: Any = None,
                  config: str | os.PathLike | None = None) -> tuple[Any, Checkpoint]:
    """A StableDiffusionPipeline from a local diffusers folder, or a single file plus ``config`` (a local
    diffusers folder of the same architecture that supplies the component configs)."""
    quiet_libraries()  # before diffusers is imported: it imports transformers, which logs on import
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(model)
    ckpt = detect(path)
    if ckpt.architecture not in SUPPORTED:
        raise UnsupportedModelError(f"{path} is {ckpt.architecture}; erase and generate support SD1.x, SD2.x and "
                                    "SDXL base", "use one of those (the SDXL refiner has no prompt encoder of its own "
                                    "to erase from; erase with the base model)")
    dtype = torch_dtype or torch.float32
    cls = StableDiffusionXLPipeline if ckpt.architecture == "sdxl" else StableDiffusionPipeline
    if path.is_dir():
        import json

        index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").exists() else {}
        for comp in _COMPONENTS[ckpt.architecture]:
            if not (isinstance(index.get(comp), list) and index[comp][0] and (path / comp).is_dir()):
                raise LayoutError(f"model folder {path} lacks its {comp} ({comp}/ folder or model_index.json entry)",
                                  "use a complete diffusers pipeline folder")
        extra = {} if cls is StableDiffusionXLPipeline else {"safety_checker": None, "feature_extractor": None,
                                                             "requires_safety_checker": False}
        load = lambda: cls.from_pretrained(path, local_files_only=True, torch_dtype=dtype, **extra)  # noqa: E731
    else:
        if config is None:
            raise ErasekitError(f"loading the single file {path} needs the configs of its architecture",
                                "pass --config DIR, a local diffusers folder of the same model family")
        if not Path(config).is_dir():
            raise InputFileError(f"--config {config} is not a folder", "name a local diffusers pipeline folder")
        load = lambda: cls.from_single_file(str(path), config=str(config), local_files_only=True,  # noqa: E731
                                            torch_dtype=dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = load()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LayoutError(f"cannot load a pipeline from {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                          "check that the folder is a complete local diffusers pipeline") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), ckpt
