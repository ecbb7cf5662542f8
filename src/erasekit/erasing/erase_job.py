"""The ``erasekit erase`` job in two halves: :func:`prepare_erase` checks everything that can be refused (settings,
output, image folders, earlier patches) before a model is loaded; :func:`run_erase` erases on a loaded pipeline and
writes the patch. :func:`erase_model` is the two together; a batch (:mod:`erasekit.erasing.batch`) prepares every job first
and loads each model once."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ErasekitError
from ..format._st import check_new_output
from ..format.erase_config import EraseConfig, effective_settings, recommended_for
from .training_images import image_key, images_digest
from .unlearn import Clock, EraseReport, StepInfo, erase, offloaded_blocks


@dataclass
class EraseJob:
    """An erase that passed every check that needs no model."""

    model: Path  # a local file or folder (a model id already resolved)
    concepts: list[str]
    groups: list[list[Any]] | None  # per concept: image paths, or (image, caption) pairs; None: drawn by the model
    config: EraseConfig
    output: Path
    num_images: int = 4  # images per concept the model draws when ``groups`` is None
    config_dir: Path | None = None
    prediction_type: str | None = None
    after: list[Any] = field(default_factory=list)  # the earlier patches (Patch objects)
    sources: dict[str, str] = field(default_factory=dict)  # setting -> "user", "model" or "native" (the rest: defaults)
    text_encoders: tuple[Path, ...] = ()  # a transformer file's encoder files (checkpoints.parts)
    vae: Path | None = None  # and its VAE file

    def load_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one loaded pipeline."""
        return (
            str(self.model),
            str(self.config_dir),
            self.prediction_type,
            self.config.device,
            self.config.dtype,
            self.config.offload,
            self.config.train,  # with dtype, the encoders' dtype: a dense erase must not train bf16-loaded weights
            tuple(map(str, self.text_encoders)),
            str(self.vae),
        )

    def images_digest(self) -> str | None:
        """The sha256 the patch records for its training images, where it is known before the model is loaded."""
        if self.groups is None:
            return None
        return images_digest(
            [
                image_key(item[0] if isinstance(item, tuple) else item, self.config.resolution)
                for group in self.groups
                for item in group
            ]
        )


def prepare_erase(
    model: str | os.PathLike | None,
    concepts: Sequence[str],
    images: Sequence[str | os.PathLike] | str | None,
    output: str | os.PathLike,
    config: EraseConfig | dict[str, Any] | None = None,
    *,
    num_images: int = 4,
    config_dir: str | os.PathLike | None = None,
    prediction_type: str | None = None,
    text_encoders: Sequence[str | os.PathLike] = (),
    vae: str | os.PathLike | None = None,
    after: Sequence[str | os.PathLike] = (),
    replace: bool = False,
    make_folder: bool = False,
) -> EraseJob:
    """Check an erase without loading the model (see :func:`erase_model` for the arguments). ``replace``: an
    existing ``output`` is allowed (a batch that redoes a job replaces its patch); ``make_folder``: the output's
    folder may be missing (:func:`run_erase` makes it). ``text_encoders`` and ``vae``: for a transformer file kept
    apart (``flux1-dev.safetensors``), its encoder files and VAE file (:mod:`erasekit.checkpoints.parts`)."""
    from ..checkpoints.hub import resolve_model
    from ..checkpoints.model_configs import native_resolution
    from ..checkpoints.parts import detect_model
    from ..checkpoints.pipeline import model_settings, runnable_family
    from ..format.patchfile import load_patch
    from ..toyworld import builtin_model_path

    if not concepts:
        raise ErasekitError("no concept given", "name at least one concept", option="concepts")
    model = resolve_model(model) if model is not None else builtin_model_path()
    ckpt = detect_model(
        model, text_encoders, vae, config_dir
    )  # its files' headers: a truncated or foreign file is refused before anything runs
    # a text encoder alone, a FLUX.1 file without configs: refused before anything is read
    fam = runnable_family(ckpt, config_dir)
    settings = model_settings(model)
    sources: dict[str, str] = {}
    if not isinstance(config, EraseConfig):
        config, sources = effective_settings(
            recommended_for(settings, list(concepts)), config or {}, settings.get("erase_recipes")
        )
        sources = {k: v for k, v in sources.items() if v != "default"}
        config, sources = _at_native_size(config, sources, native_resolution(ckpt, config_dir, prediction_type))
    config, sources = _training_decided(config, sources, ckpt)
    offloaded_blocks(config.offload, fam)  # a UNet is not streamed
    _check_concept_templates(config, concepts)
    _check_kept_not_erased(config, concepts)
    out = Path(output)
    check_new_output(out, replace, make_folder)
    groups: list[list[Any]] | None = None
    if images is None and not settings.get("toyworld"):
        raise ErasekitError(
            f"{model} needs images of the concept",
            "give a folder of images per concept, or 'auto' to let the model draw them",
            option="images",
        )
    if images is None:  # the built-in world draws the concept itself
        from ..toyworld.concepts import render_concept

        groups = [[render_concept(c, seed=config.seed * 1000 + i) for i in range(num_images)] for c in concepts]
    elif images != "auto":
        dirs = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        if len(dirs) != len(concepts):
            raise ErasekitError(
                f"{len(concepts)} concepts but {len(dirs)} image folders",
                "give one image folder per concept, in the same order, or 'auto'",
                option="images",
            )
        from .training_images import find_images

        groups = [list(find_images(d)) for d in dirs]
    earlier = [load_patch(p) for p in after]
    return EraseJob(
        model,
        list(concepts),
        groups,
        config,
        out,
        num_images,
        Path(config_dir) if config_dir is not None else None,
        prediction_type,
        earlier,
        sources,
        tuple(Path(p) for p in text_encoders),
        Path(vae) if vae is not None else None,
    )


def _at_native_size(
    config: EraseConfig, sources: dict[str, str], native: int | None
) -> tuple[EraseConfig, dict[str, str]]:
    """Train at the size the model renders at (SDXL 1024, SD2 768-v 768), as generate, eval and the UIs do, unless
    the user or the model's erasekit.json chose one; a size chosen otherwise says what the native one is."""
    if native is None or config.resolution == native:
        return config, sources
    if "resolution" not in sources:
        return config.model_copy(update={"resolution": native}), sources | {"resolution": "native"}
    return config, sources | {"resolution": f"{sources['resolution']}; native {native}"}


def _training_decided(config: EraseConfig, sources: dict[str, str], ckpt: Any) -> tuple[EraseConfig, dict[str, str]]:
    """``train: auto`` decided by the encoders the erase will train (factors where one is a T5), before the model
    loads, so that a batch compares what the patch will record; the settings so decided say so."""
    kinds = [e.encoder_kind.name for s, e in ckpt.encoders.items() if config.encoders is None or s in config.encoders]
    decided = config.for_kinds(kinds)
    if decided.train != "factors" or config.train == "factors":
        return decided, sources
    return decided, sources | {k: "the T5 default" for k in ("train", "rank") if k not in sources}


def _check_concept_templates(config: EraseConfig, concepts: Sequence[str]) -> None:
    """Templates given for a concept the erase neither erases nor keeps would do nothing: a typo, most likely."""
    named = {c.lower() for c in [*concepts, *config.keep]}
    stray = [c for c in config.concept_templates if c.lower() not in named]
    if stray:
        raise ErasekitError(
            f"templates are given for {stray[0]!r}, which this erase neither erases nor keeps",
            "name it as a --concept or --keep, or check its spelling",
            option="concept_templates",
        )


def _check_kept_not_erased(config: EraseConfig, concepts: Sequence[str]) -> None:
    """A concept both erased and kept would be pushed away and held in place at once (its prompts held at
    ``keep_weight`` against its own erasure): one of the two is a mistake."""
    erased = {c.lower() for c in concepts}
    both = [k for k in config.keep if k.lower() in erased]
    if both:
        raise ErasekitError(
            f"{both[0]!r} is both erased (--concept) and kept (--keep)",
            "name it in one of the two",
            option="keep",
        )


def load_for(job: EraseJob, clock: Clock) -> tuple[Any, Any]:
    """The pipeline and checkpoint a job runs on: the frozen UNet in the dtype the loop computes in, the text
    encoders in the dtype the erase holds them in (:func:`~erasekit._torch.encoder_dtype`: fp32 where their weights
    train; under ``train: factors`` frozen, in bf16 where the loop computes in it) and the VAE in fp32 (it encodes
    the training images once: SDXL's overflows in fp16, and bf16 weights would round the latents)."""
    import torch

    from .._torch import compute_dtype, encoder_dtype
    from ..checkpoints.pipeline import load_pipeline, resolve_device

    device = resolve_device(job.config.device)
    with clock("load"):
        return load_pipeline(
            job.model,
            device=device,
            torch_dtype=compute_dtype(job.config.dtype, device),
            text_encoder_dtype=encoder_dtype(job.config.train, job.config.dtype, device),
            vae_dtype=torch.float32,
            config=job.config_dir,
            text_encoders=job.text_encoders,
            vae=job.vae,
            prediction_type=job.prediction_type,
            offload_blocks=job.config.offload == "blocks",
        )


def run_erase(
    job: EraseJob, pipe: Any, ckpt: Any, clock: Clock, progress: Callable[[StepInfo], None] | None = None
) -> EraseReport:
    """Erase on a pipeline :func:`load_for` loaded (drawing the images first where the job asks the model to),
    and write the patch atomically. The pipeline is given back as it was."""
    from ..format.patchfile import save_patch
    from ..format.ui_export import ui_advice

    t0 = time.perf_counter()
    groups = job.groups if job.groups is not None else _draw_images(job, pipe, clock)
    report = erase(pipe, job.concepts, groups, job.config, progress=progress, base_files=ckpt, after=job.after)
    with clock("save"):
        job.output.parent.mkdir(parents=True, exist_ok=True)
        save_patch(report.patch, job.output)
    report.output, report.patch_bytes = str(job.output), job.output.stat().st_size
    report.ui = ui_advice(report.patch, job.output)
    report.sources = dict(job.sources)
    before_erase = {k: v for k, v in clock.seconds.items() if k != "save"}
    report.timings = before_erase | report.timings | {"save": clock.seconds["save"]}  # in the order they ran
    report.total_seconds = time.perf_counter() - t0
    return report


def _draw_images(job: EraseJob, pipe: Any, clock: Clock) -> list[list[Any]]:
    """``images auto``: ``num_images`` per concept, drawn by the unpatched model (its blocks streamed where the job
    offloads them)."""
    import torch

    from ..checkpoints.pipeline import denoiser_of
    from ..families import of_pipeline
    from ..judging.sampling import concept_prompt, render
    from .streaming import streamed

    denoiser = denoiser_of(pipe)
    dtype = denoiser.dtype  # the encoders may be fp32 and the denoiser not: autocast bridges them
    blocks = offloaded_blocks(job.config.offload, of_pipeline(pipe))
    with (
        clock("render"),
        streamed(denoiser, blocks, denoiser.device),
        torch.autocast(denoiser.device.type, dtype=dtype, enabled=dtype != torch.float32),
    ):
        return [
            [
                render(pipe, concept_prompt(c, job.config.kind), seed=job.config.seed + i, resolution=None)
                for i in range(job.num_images)
            ]
            for c in job.concepts
        ]


def erase_model(
    model: str | os.PathLike | None,
    concepts: Sequence[str],
    images: Sequence[str | os.PathLike] | str | None,
    output: str | os.PathLike,
    config: EraseConfig | dict[str, Any] | None = None,
    *,
    num_images: int = 4,
    config_dir: str | os.PathLike | None = None,
    prediction_type: str | None = None,
    text_encoders: Sequence[str | os.PathLike] = (),
    vae: str | os.PathLike | None = None,
    after: Sequence[str | os.PathLike] = (),
    progress: Callable[[StepInfo], None] | None = None,
) -> EraseReport:
    """The ``erasekit erase`` job: load the model (default: the built-in one), gather the images, erase, and
    write the patch atomically to ``output``. ``after``: patch files the new patch will be stacked on (see
    :func:`~erasekit.erasing.unlearn.erase`).

    ``images``: one folder per concept; ``"auto"`` renders ``num_images`` per concept with the unmodified
    model; ``None`` is allowed for the built-in toy world, whose renderer draws the concept.
    ``config``: an :class:`EraseConfig`, or a dict of settings laid over the model's recommended ones
    (``erasekit.json`` in the model folder; the published recipe where there is none).
    ``text_encoders`` and ``vae``: for a transformer file kept apart (Black Forest Labs' ``flux1-dev.safetensors``),
    its encoder files (in any order) and its VAE file.
    """
    from ..checkpoints.pipeline import model_threads

    t0 = time.perf_counter()
    clock = Clock()
    with clock("import"):  # torch and diffusers here, so that their cost shows as "import", not as "load"
        import_libraries()
    job = prepare_erase(
        model,
        concepts,
        images,
        output,
        config,
        num_images=num_images,
        config_dir=config_dir,
        prediction_type=prediction_type,
        text_encoders=text_encoders,
        vae=vae,
        after=after,
    )
    with model_threads(job.model):
        pipe, ckpt = load_for(job, clock)
        report = run_erase(job, pipe, ckpt, clock, progress)
    report.total_seconds = time.perf_counter() - t0
    return report


def import_libraries() -> None:
    """Import torch and diffusers (quietly): a caller times this as its own phase."""
    import importlib

    from ..checkpoints.pipeline import quiet_libraries

    quiet_libraries()
    for library in ("torch", "diffusers"):
        importlib.import_module(library)
