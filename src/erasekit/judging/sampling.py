"""Render prompts with and without patches, same seeds: PNGs with their settings in the metadata, and a grid."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ErasekitError, InputFileError
from ..families.base import Sampling


class GenerateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(4, ge=1)
    seed: int = 0
    steps: int | None = Field(None, ge=1)  # None: the model's default (see sampling_of)
    guidance: float | None = None  # None: the model's default
    resolution: int | None = Field(None, ge=8)  # None: the model's native size
    strength: float = 1.0
    compare: bool = False
    device: str = "auto"
    batch_size: int = Field(1, ge=1)  # seeds of a prompt rendered in one pipeline call (GPUs); same images


@dataclass
class GeneratedImage:
    path: str
    prompt: str
    seed: int
    patched: bool


@dataclass
class GenerateReport:
    out_dir: str
    grid: str
    images: list[GeneratedImage] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(
        default_factory=list
    )  # on the stack of patches (see erasekit.checkpoints.compat.order_notes), and a guidance nothing reads
    steps: int | None = None  # what it sampled with: the config's, else the model's defaults (see sampling_of)
    guidance: float | None = None
    guidance_kind: str = "cfg"  # what read the guidance: "cfg", "distilled" (FLUX.1 dev) or "none" (FLUX.1 schnell)
    settings: str = ""  # "28 steps, distilled guidance 3.5 (FLUX.1 dev's default steps and guidance)"


def concept_prompt(concept: str, kind: str = "object") -> str:
    """The prompt used to render a concept's training images when the user has none."""
    return f"a painting in the style of {concept}" if kind == "style" else f"a photo of a {concept}"


def render(
    pipe: Any,
    prompt: str,
    *,
    seed: int,
    resolution: int | None,
    steps: int | None = None,
    guidance: float | None = None,
) -> Any:
    """One image, seeded on the CPU so the same seed gives the same picture on any device (``steps``, ``guidance``:
    see :func:`sampling_of`)."""
    return render_batch(pipe, [prompt], [seed], resolution=resolution, steps=steps, guidance=guidance)[0]


class ModelSampling(BaseModel):
    """A model's own sampling recommendation, the ``"sample"`` entry of its folder's ``erasekit.json``, which wins
    over its family's: the built-in FLUX.1-family toy model has no guidance embedding (as schnell) but was trained
    for classifier-free guidance on prompts of 16 T5 tokens."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=1)
    guidance: float
    guidance_kind: Literal["cfg", "distilled", "none"] = "cfg"
    max_sequence_length: int | None = Field(None, ge=1)
    title: str = "the model's erasekit.json"


def model_sampling(pipe: Any) -> Sampling | None:
    """The ``"sample"`` entry of the ``erasekit.json`` of the folder ``pipe`` was loaded from; None where it has
    none."""
    from ..checkpoints.layouts import read_json

    folder = getattr(pipe, "name_or_path", None)
    path = Path(folder) / "erasekit.json" if isinstance(folder, (str, os.PathLike)) and str(folder) else None
    if path is None or not path.is_file():
        return None
    entry = read_json(path, "repair or delete it").get("sample")
    if entry is None:
        return None
    try:
        return Sampling(**ModelSampling.model_validate(entry).model_dump())
    except ValidationError as e:
        err = e.errors()[0]
        raise InputFileError(
            f'{path}: its "sample" entry: {".".join(map(str, err["loc"])) or "the entry"}: {err["msg"]}',
            f"give {', '.join(ModelSampling.model_fields)} (steps and guidance required), or remove the entry",
        ) from None


def sampling_of(pipe: Any, steps: int | None = None, guidance: float | None = None) -> Sampling:
    """What a loaded pipeline is sampled with: ``steps`` and ``guidance`` where given, else the model's own
    recommendation (:func:`model_sampling`), else its family's defaults for it (``Family.sampling``: SD1.x, SD2.x
    and SDXL 25 steps at CFG scale 7.5; FLUX.1 dev 28 at a distilled guidance of 3.5, schnell 4 without guidance;
    SD3.x as its model card says). ``title`` is whose defaults are used (the family's variant), else empty."""
    from ..families import of_pipeline

    fam = of_pipeline(pipe)
    defaults = model_sampling(pipe)
    if defaults is None:
        defaults = fam.sampling_of(lambda c, key: _config_value(pipe, c, key)) if fam is not None else Sampling()
    return replace(
        defaults,
        steps=defaults.steps if steps is None else steps,
        guidance=defaults.guidance if guidance is None else float(guidance),
        title=defaults.title if steps is None or guidance is None else "",
    )


def _config_value(pipe: Any, component: str, key: str) -> Any:
    """A setting of a loaded pipeline component's config (None where it has no such component or setting)."""
    return getattr(getattr(getattr(pipe, component, None), "config", None), key, None)


def settings_line(sampling: Sampling, steps: int | None, guidance: float | None) -> str:
    """``"28 steps, distilled guidance 3.5 (FLUX.1 dev's default steps and guidance)"``: the resolved settings of
    :func:`sampling_of`, and which of them are a model's defaults (``steps``/``guidance``: as given, None)."""
    defaulted = [what for what, given in (("steps", steps), ("guidance", guidance)) if given is None]
    whose = f" ({sampling.title}'s default {' and '.join(defaulted)})" if sampling.title and defaulted else ""
    return sampling.describe() + whose


def guidance_notes(sampling: Sampling, guidance: float | None) -> list[str]:
    """A note where a guidance was given that the model does not read (FLUX.1 schnell)."""
    if sampling.guidance_kind != "none" or not guidance:
        return []
    return [
        f"the guidance {guidance:g} has no effect: this model reads none (a FLUX.1 schnell transformer has no "
        "guidance embedding)"
    ]


def a1111_guidance(sampling: Sampling) -> str:
    """The guidance as A1111-style ``parameters`` say it: ``CFG scale: 7.5``; for a guidance-distilled model
    ``CFG scale: 1, Distilled CFG Scale: 3.5`` as Forge writes FLUX.1 dev's (and reads back into its own field,
    where a ``CFG scale: 3.5`` would turn on real CFG); a model that reads none, ``CFG scale: 1``."""
    if sampling.guidance_kind == "cfg":
        return f"CFG scale: {sampling.guidance}"
    if sampling.guidance_kind == "distilled":
        return f"CFG scale: 1, Distilled CFG Scale: {sampling.guidance}"
    return "CFG scale: 1"


def native_size(pipe: Any) -> int:
    """The image size a loaded pipeline renders at by default: its denoiser's ``sample_size`` times the VAE's scale
    factor (SD1 512, SDXL 1024, SD3.x 1024), or, for a denoiser without one (FLUX.1's transformer), the VAE's own
    ``sample_size`` (FLUX.1 1024)."""
    from ..checkpoints.pipeline import denoiser_of

    size = getattr(denoiser_of(pipe).config, "sample_size", None)
    return int(size * pipe.vae_scale_factor) if size else int(pipe.vae.config.sample_size)


def render_batch(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    resolution: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> list[Any]:
    """Images for (prompt, seed) pairs, ``batch_size`` per pipeline call. Each image has its own CPU generator, so
    its initial noise does not depend on the batch (the arithmetic of a batch may round differently in the last
    bits). ``steps``, ``guidance``: see :func:`sampling_of`."""
    import torch

    size = resolution or native_size(pipe)
    sampling = sampling_of(pipe, steps, guidance)
    extra = {"max_sequence_length": sampling.max_sequence_length} if sampling.max_sequence_length else {}
    true_cfg = _true_cfg(pipe, sampling)
    images: list[Any] = []
    for i in range(0, len(prompts), batch_size):
        p, s = list(prompts[i : i + batch_size]), seeds[i : i + batch_size]
        cfg = {"true_cfg_scale": sampling.guidance, "negative_prompt": [""] * len(p)} if true_cfg else {}
        images += pipe(
            p,
            generator=[torch.Generator().manual_seed(x) for x in s],
            num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance,
            height=size,
            width=size,
            **extra,
            **cfg,
        ).images
        if progress:
            progress(len(p))
    return images


def _true_cfg(pipe: Any, sampling: Sampling) -> bool:
    """Whether classifier-free guidance must be asked for as FluxPipeline's ``true_cfg_scale`` (with the empty
    prompt as the negative): a FLUX.1 transformer without a guidance embedding sampled with CFG, where
    ``guidance_scale`` alone would guide nothing."""
    import inspect

    return (
        sampling.guidance_kind == "cfg"
        and "true_cfg_scale" in inspect.signature(type(pipe).__call__).parameters
        and not _config_value(pipe, "transformer", "guidance_embeds")
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def image_stems(prompts: Sequence[str]) -> dict[str, str]:
    """Each prompt's file-name stem: its slug, readable and the same from run to run. Prompts of one run that share
    a slug (they differ in case or punctuation, are not in ASCII, or share their first 60 characters) get, each, the
    first 8 hex digits of the sha256 of their exact text after it (``a-photo-of-a-cat_1f3a9c0e``), so that every
    image has its own file; a repeated prompt is refused (its images would be the same)."""
    repeated = next((p for p, k in Counter(prompts).items() if k > 1), None)
    if repeated is not None:
        raise ErasekitError(
            f"the prompt {repeated!r} is given twice", "give each prompt once (-n sets the images per prompt)"
        )
    slugs = {p: _slug(p) for p in prompts}
    sharing = Counter(slugs.values())
    return {p: s if sharing[s] == 1 else f"{s}_{hashlib.sha256(p.encode()).hexdigest()[:8]}" for p, s in slugs.items()}


def _save_png(img: Any, path: Path, info: dict[str, str]) -> None:
    from PIL.PngImagePlugin import PngInfo

    from ..format._st import atomic_write

    meta = PngInfo()
    for k, v in info.items():
        meta.add_text(k, v)
    with atomic_write(path) as f:
        img.save(f, format="PNG", pnginfo=meta)


def make_grid(rows: list[tuple[str, list[Any]]], columns: list[str]) -> Any:
    """A labelled grid: one row per (label, images), one column per label in ``columns``."""
    from PIL import Image, ImageDraw, ImageFont

    scale = -(-128 // rows[0][1][0].size[0])  # small images are enlarged (nearest) so they can be seen
    if scale > 1:
        rows = [
            (label, [im.resize((im.size[0] * scale, im.size[1] * scale), Image.Resampling.NEAREST) for im in imgs])
            for label, imgs in rows
        ]
    w, h = rows[0][1][0].size
    cell = w + 4
    font = ImageFont.load_default()
    label_w, head_h = 220, 20
    grid = Image.new("RGB", (label_w + cell * len(columns), head_h + (h + 4) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, col in enumerate(columns):
        draw.text((label_w + j * cell + 4, 4), col, fill="black", font=font)
    for i, (label, imgs) in enumerate(rows):
        y = head_h + i * (h + 4)
        draw.text((4, y + 4), label[:36], fill="black", font=font)
        for j, img in enumerate(imgs):
            grid.paste(img, (label_w + j * cell, y))
    return grid


def generate(
    pipe: Any,
    prompts: Sequence[str],
    out_dir: str | os.PathLike,
    config: GenerateConfig | None = None,
    *,
    patches: Sequence[Any] = (),
    model_name: str = "",
    progress: Callable[[int, int], None] | None = None,
    in_place: Sequence[dict[str, Any]] = (),
    checked: Sequence[str] = (),
) -> GenerateReport:
    """Render ``config.n`` seeds per prompt with ``patches`` applied (and without, if ``config.compare``).

    Writes ``<prompt>_<seed>[_before|_after].png`` (``<prompt>``: see :func:`image_stems`) and ``grid.png`` into
    ``out_dir``; the pipeline's weights are as they were when this returns. ``in_place``: the patches already in
    the pipeline's weights (``patch_id``, ``title``), for the notes on the stack; ``checked``: see
    :func:`erasekit.checkpoints.memory.patches_applied` (both from :func:`erasekit.checkpoints.in_place.in_place_stack`).
    """
    from ..checkpoints.compat import order_notes
    from ..checkpoints.memory import patches_applied
    from ..format.patchfile import load_patch

    t0 = time.perf_counter()
    config = config or GenerateConfig()
    if not prompts:
        raise ErasekitError("no prompt given", 'pass one or more prompts, e.g. erasekit generate "a photo of a cat"')
    if config.compare and not patches:
        raise ErasekitError("compare needs at least one patch", "add a patch, or do not compare", option="compare")
    stems = image_stems(prompts)
    loaded = [p if not isinstance(p, (str, os.PathLike)) else load_patch(p) for p in patches]
    sampling = sampling_of(pipe, config.steps, config.guidance)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [config.seed + i for i in range(config.n)]
    passes = ([False, True] if config.compare else [True]) if loaded else [False]
    total, done = len(prompts) * len(seeds) * len(passes), 0
    report = GenerateReport(
        str(out),
        str(out / "grid.png"),
        notes=[*order_notes(loaded, in_place), *guidance_notes(sampling, config.guidance)],
        steps=sampling.steps,
        guidance=sampling.guidance,
        guidance_kind=sampling.guidance_kind,
        settings=settings_line(sampling, config.steps, config.guidance),
    )
    rows: list[tuple[str, list[Any]]] = []
    patch_meta = [{"title": p.title, "patch_id": p.patch_id} for p in loaded]
    for patched in passes:
        with patches_applied(pipe, loaded if patched else [], config.strength, checked):
            for prompt in prompts:
                imgs = []
                rendered = render_batch(
                    pipe,
                    [prompt] * len(seeds),
                    seeds,
                    resolution=config.resolution,
                    steps=sampling.steps,
                    guidance=sampling.guidance,
                    batch_size=config.batch_size,
                )
                for seed, img in zip(seeds, rendered):
                    suffix = ("_after" if patched else "_before") if config.compare else ""
                    path = out / f"{stems[prompt]}_{seed}{suffix}.png"
                    w, h = img.size
                    _save_png(
                        img,
                        path,
                        {
                            "prompt": prompt,
                            "seed": str(seed),
                            "parameters": f"{prompt}\nSteps: {sampling.steps}, Sampler: {type(pipe.scheduler).__name__}, "
                            f"{a1111_guidance(sampling)}, Seed: {seed}, Size: {w}x{h}, Model: {model_name}",
                            "erasekit": json.dumps(
                                {
                                    "patches": patch_meta if patched else [],
                                    "strength": config.strength,
                                    "steps": sampling.steps,
                                    "guidance": sampling.guidance,
                                    "guidance_kind": sampling.guidance_kind,
                                    "model": model_name,
                                }
                            ),
                        },
                    )
                    report.images.append(GeneratedImage(str(path), prompt, seed, patched))
                    imgs.append(img)
                    done += 1
                    if progress:
                        progress(done, total)
                label = prompt if not config.compare else f"{'after' if patched else 'before'}: {prompt}"
                rows.append((label, imgs))
    if config.compare:  # before/after rows next to each other, per prompt
        k = len(prompts)
        rows = [r for i in range(k) for r in (rows[i], rows[k + i])]
    grid = make_grid(rows, [f"seed {s}" for s in seeds])
    from ..format._st import atomic_write

    with atomic_write(out / "grid.png") as f:
        grid.save(f, format="PNG")
    report.seconds = time.perf_counter() - t0
    return report


def generate_model(
    model: str | os.PathLike | None,
    prompts: Sequence[str],
    out_dir: str | os.PathLike,
    config: GenerateConfig | None = None,
    *,
    patches: Sequence[str | os.PathLike] = (),
    config_dir: str | os.PathLike | None = None,
    prediction_type: str | None = None,
    text_encoders: Sequence[str | os.PathLike] = (),
    vae: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> GenerateReport:
    """The ``erasekit generate`` job: load the model and the patches (all validated first), then render.
    ``text_encoders`` and ``vae``: for a transformer file kept apart, its encoder files and VAE file."""
    from ..checkpoints.in_place import in_place_stack
    from ..checkpoints.pipeline import load_pipeline, model_threads, resolve_device
    from ..format.patchfile import load_patch
    from ..toyworld import builtin_model_path

    config = config or GenerateConfig()
    loaded = [load_patch(p) for p in patches]  # a bad patch fails before the model loads
    model = model if model is not None else builtin_model_path()
    with model_threads(model):
        pipe, ckpt = load_pipeline(
            model,
            device=resolve_device(config.device),
            config=config_dir,
            prediction_type=prediction_type,
            text_encoders=text_encoders,
            vae=vae,
        )
        in_place, checked = in_place_stack(loaded, ckpt)
        return generate(
            pipe,
            prompts,
            out_dir,
            config,
            patches=loaded,
            model_name=ckpt.path.name,
            progress=progress,
            in_place=in_place,
            checked=checked,
        )
