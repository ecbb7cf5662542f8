#!/usr/bin/env python
"""Every GPU figure of issue #10 in one run, printed as a markdown table for bench/README.md.

    python bench/gpu_suite.py                  # one GPU (cuda): SD1.x, then SDXL size; 3-4 min on an H200 (estimate)
    python bench/gpu_suite.py --only sd1       # one model
    python bench/gpu_suite.py --only flux      # FLUX.1-dev size (or sd3: SD3.5-large size; flux,sd3: both)
    python bench/gpu_suite.py --quick          # tiny test pipelines on the CPU, 2 steps, no warm-ups: checks the script

The paper's setting: 512 px images (64x64 latents), batch 2, 10 optimizer steps, 4 random training images,
one concept. Models with seeded random weights, built on the device from erasekit's bundled configs
(``src/erasekit/checkpoints/configs/sd1`` and ``sdxl``): SD1.x size is UNet + CLIP-L + VAE, SDXL size is UNet + CLIP-L +
OpenCLIP-bigG + VAE, with the real CLIP tokenizer erasekit ships.

Each model runs in two stages, with the weights held as ``erasekit erase`` holds them:

* ``auto``: UNet and VAE in the compute dtype (bf16 on a GPU with bf16), text encoders in fp32.
  1. a warm-up erase (2 steps), then a whole erase at the paper's setting with the defaults (``dtype auto``,
     ``rank auto``): its loop time, its ``EraseReport.timings`` (phase -> seconds), its peak memory, and the
     size of its patch written by ``save_patch``;
  2. the same erase with ``rank dense``: the dense patch's size;
  3. the same erase with ``checkpointing=True``: peak memory and loop time;
  4. one 512 px image (10 denoising steps, guidance 7.5, erasekit.judging.sampling.render under autocast, as
     ``erasekit erase --images auto`` renders), after a 1-step warm-up: peak memory and seconds.
* ``fp32``: UNet and VAE cast to fp32.
  5. the published recipe's loop (bench/erase_speed.reference_loop; fp32, every text-encoder parameter in Adam,
     the text encoder saved every epoch) on the latents erasekit encodes, 2 warm-up steps, then the timed steps.
     It is SD1-only as written (one encoder, no SDXL added conditioning): for SDXL the cell says so;
  6. erasekit with ``dtype fp32`` (warm-up, then timed): separates the bf16 gain from the rest;
  7. one image generated in fp32: peak memory.

Times: seconds over the optimizer steps, with the device synchronized before and after (erase's own
``loop_seconds``; its loop reads each step's loss, and a progress callback synchronizes after every step).
Memory: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` and ``empty_cache`` before each
run; it includes the weights already on the device (shown as "resident"). GB = 10^9 bytes.

A cell that runs out of device memory says OOM, one that fails says error (traceback on stderr), and the next
cell runs. Cells not started before ``--budget`` seconds (default 270, so that a run fits one 5-minute device
call) say so. Progress lines go to stderr as each cell ends, so a run cut short still shows its figures.

The reference loop is bench/erase_speed.reference_loop (it moves each step's token ids, timesteps and noise to
the model's device and synchronizes the device around its timer).

FLUX.1-dev size (``--only flux``: transformer 11.9 B, CLIP-L, T5-XXL 4.76 B, VAE) and SD3.5-large size (``--only
sd3``: transformer 8.1 B, CLIP-L, OpenCLIP-bigG, T5-XXL, VAE), at the same setting (512 px, batch 2, 10 steps after
2 warm-up steps; SD3.5 large's native size is 1024 px), built from ``configs/flux-dev`` and ``configs/sd3.5-large``
with seeded random weights, on the device, held as ``erasekit erase`` holds them (transformer and VAE in the compute
dtype, text encoders too: an erase through T5 trains factors and holds the frozen encoders so), with the CLIP tokenizer erasekit ships and the toy world's counted T5 tokenizer
(T5's does not ship; the prompts are padded to the family's T5 length either way). There is no reference loop
and no fp32 stage. After a warm-up erase (2 steps):

  1. an erase with the defaults: T5 (and CLIP) train rank-16 factors (``train: auto`` -> factors): loop time,
     timings, peak memory, trained parameters and Adam's state, patch size;
  2. the 24 GB configuration: the defaults with ``offload: blocks`` (the transformer's blocks in CPU memory,
     streamed to the GPU for each forward pass and again for the backward), the encoders held as in 1: loop time,
     peak memory, bytes moved;
  3. the same with the CLIPs only (``encoders``: te1 for FLUX, te1,te2 for SD3; dense, ``rank auto``);
  4. one 512 px image with the family's default sampling (FLUX.1-dev 28 steps at distilled guidance 3.5; SD3.5
     large as its model card says), after a 1-step warm-up;
  5. the defaults with ``checkpointing=True``;
  6. T5 trained densely (``train: dense``, ``rank: dense``; 3.02 B parameters in Adam): expected OOM on 80 GB.

A FLUX.1 or SD3.x run (``--only flux`` or ``--only sd3``) should take 3 to 5 minutes on an H100 (estimate).
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import erase_speed  # noqa: E402  (bench/erase_speed.py: the reference loop, random images)

from erasekit.checkpoints.pipeline import quiet_libraries  # noqa: E402
from erasekit.format.erase_config import EraseConfig  # noqa: E402

CONCEPT = "snoopy"
UNET_MODELS = ("sd1", "sdxl")
MODELS = (*UNET_MODELS, "flux", "sd3")
NAMES = {"sd1": "SD1.x size", "sdxl": "SDXL size", "flux": "FLUX.1-dev size", "sd3": "SD3.5-large size"}


@dataclass(frozen=True)
class FlowModel:
    config: str  # erasekit's bundled config it is built from
    clips: tuple[str, ...]  # the slots of its CLIP encoders: the erase without T5 trains these


FLOW = {"flux": FlowModel("flux-dev", ("te1",)), "sd3": FlowModel("sd3.5-large", ("te1", "te2"))}


@dataclass(frozen=True)
class Setting:
    resolution: int  # training and generated image size
    steps: int  # timed optimizer steps
    warmup: int  # optimizer steps before timing
    batch: int
    images: int
    gen_steps: int  # denoising steps of the generated image


PAPER = Setting(resolution=512, steps=10, warmup=2, batch=2, images=4, gen_steps=10)
QUICK = Setting(resolution=32, steps=2, warmup=0, batch=2, images=4, gen_steps=2)  # no warm-up erases: time


class Skipped(Exception):
    """A cell that is not run, with the reason to print in its place."""


# -- models ---------------------------------------------------------------------------------------


def full_size_pipeline(arch: str, device: torch.device) -> Any:
    """An SD1.x- or SDXL-size diffusers pipeline with seeded random weights, built directly on ``device`` (fp32)."""
    quiet_libraries()
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from erasekit.checkpoints.model_configs import CONFIGS_DIR, ConfigChoice

    folder = CONFIGS_DIR / arch
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: seconds on a GPU instead of a minute on the CPU
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae")))
        te = CLIPTextModel(CLIPTextConfig.from_json_file(str(folder / "text_encoder" / "config.json")))
        te2 = (
            CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(str(folder / "text_encoder_2" / "config.json")))
            if arch == "sdxl"
            else None
        )
    for module in (unet, vae, te, te2):  # in case a constructor put a tensor elsewhere
        if module is not None:
            module.to(device).eval()
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    sched = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    toks = ConfigChoice(arch, folder, "epsilon", "bundled", bundled=True).tokenizers()
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=te,
            text_encoder_2=te2,
            tokenizer=toks["tokenizer"],
            tokenizer_2=toks["tokenizer_2"],
            unet=unet,
            scheduler=sched,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=te,
            tokenizer=toks["tokenizer"],
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def component_config(folder: Path, part: str) -> dict[str, Any]:
    """The bundled config of one pipeline component (``transformer``, ``vae``, ``text_encoder_2``...)."""
    return json.loads((folder / part / "config.json").read_text())


def random_module(folder: Path, part: str, library: str, class_name: str, device: torch.device) -> Any:
    """One component of a bundled config with seeded random weights, built on ``device`` (fp32): its constructor's
    own initialisation, which on a GPU takes seconds where a CPU takes minutes (FLUX.1's 11.9 B parameters)."""
    import diffusers
    import transformers

    cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
    cfg = component_config(folder, part)
    with torch.device(device):
        return cls.from_config(cfg) if library == "diffusers" else cls(cls.config_class.from_dict(cfg))


def full_size_flow_pipeline(arch: str, device: torch.device) -> Any:
    """A FLUX.1-dev- or SD3.5-large-size diffusers pipeline with seeded random weights, built on ``device`` and held
    as ``erasekit erase`` loads it: the transformer and the VAE in the compute dtype, the text encoders in the dtype
    an erase through T5 holds them in (``train: factors``: the compute dtype, bf16 on a GPU with bf16).
    Each component is built in fp32 and cast before the next is built (FLUX.1's transformer: 47.6 GB, then 23.8).
    CLIP's tokenizer is the one erasekit ships; T5's, which does not ship, is the toy world's counted one (its ids
    are a few hundred of T5's 32128: the cost of a step depends on the padded length, not on the ids)."""
    quiet_libraries()
    import diffusers

    from erasekit._torch import compute_dtype, encoder_dtype
    from erasekit.checkpoints.model_configs import CONFIGS_DIR, ConfigChoice
    from erasekit.families import by_bundled_config
    from erasekit.toyworld.t5_tokenizer import t5_tokenizer

    name = FLOW[arch].config
    folder = CONFIGS_DIR / name
    index = json.loads((folder / "model_index.json").read_text())
    slots = by_bundled_config(name).slots
    held = dict.fromkeys(("transformer", "vae"), compute_dtype("auto", device))
    held |= {s.component: encoder_dtype("factors", "auto", device) for s in slots}
    torch.manual_seed(0)
    parts: dict[str, Any] = {}
    for part, dtype in held.items():  # the transformer first, while the device is empty
        library, class_name = index[part]
        module = random_module(folder, part, library, class_name, device)
        parts[part] = module.to(device=device, dtype=dtype).eval()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    parts["scheduler"] = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    clips = {s.name for s in slots if s.encoder.kind.name != "t5"}
    parts |= ConfigChoice(name, folder, "flow", "bundled", bundled=True).tokenizers(clips)
    parts |= {s.tokenizer: t5_tokenizer() for s in slots if s.encoder.kind.name == "t5"}
    pipe = getattr(diffusers, index["_class_name"])(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def held_for_24gb(pipe: Any, device: torch.device) -> Iterator[None]:
    """Within the block, the transformer's streamed blocks (``Family.streamed_blocks``) in CPU memory, as ``erasekit
    erase --offload blocks`` loads them (the text encoders are already held as an erase through T5 holds them:
    :func:`full_size_flow_pipeline`); back on ``device`` after."""
    from erasekit.checkpoints.pipeline import denoiser_of
    from erasekit.erasing.streaming import blocks_of
    from erasekit.families import of_pipeline

    family = of_pipeline(pipe)
    blocks = blocks_of(denoiser_of(pipe), family.streamed_blocks if family else ())
    try:
        for block in blocks:
            block.to("cpu")
        yield
    finally:
        for block in blocks:
            block.to(device)


def tiny_pipeline(arch: str, device: torch.device, workdir: Path) -> Any:
    from erasekit.checkpoints.pipeline import load_pipeline
    from erasekit.testing import make_tiny_pipeline

    return load_pipeline(make_tiny_pipeline(workdir / f"tiny-{arch}", arch=arch), device=device)[0]


def encoders(pipe: Any) -> list[Any]:
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [te for te in (getattr(pipe, n, None) for n in names) if te is not None]


def drop_grads(pipe: Any) -> None:
    """Free the gradients an erase cut short (out of memory) left on the encoders' weights."""
    for te in encoders(pipe):
        for p in te.parameters():
            p.grad = None


def millions(module: Any) -> str:
    n = sum(p.numel() for p in module.parameters()) / 1e6
    return f"{n:.0f}M" if n >= 10 else f"{n:.2f}M"


# -- measuring ------------------------------------------------------------------------------------


class Meter:
    """Synchronizes the device and reads its peak memory (None on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.resident: int | None = None

    def sync(self, *_: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.resident = torch.cuda.memory_allocated(self.device)
        self.sync()

    def peak(self) -> int | None:
        self.sync()
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None


def reference_latents(pipe: Any, imgs: list[Any], s: Setting) -> torch.Tensor:
    """The latents erasekit's erase trains on (as bench/erase_speed.py gives the reference): VAE outside the timer."""
    from erasekit.erasing.training_images import encode_images

    cfg = EraseConfig(resolution=s.resolution, cache=False)
    loaded = [(im, im.tobytes()) for im in imgs]
    with torch.no_grad():
        mean, std = encode_images(pipe, loaded, cfg, [False] * len(imgs))
    return (
        (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0)))
        * pipe.vae.config.scaling_factor
    ).to(pipe.unet.device)


# -- the cells ------------------------------------------------------------------------------------


class Suite:
    def __init__(self, device: torch.device, s: Setting, budget: float, quick: bool) -> None:
        self.device = device
        self.s = s
        self.budget = budget
        self.quick = quick
        self.meter = Meter(device)
        self.t0 = time.perf_counter()
        self.results: dict[str, dict[str, Any]] = {}

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    def cell(self, model: str, name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        """Run one cell; its figures (or why there are none) go to results[model][name]."""
        out: Any
        if time.perf_counter() - self.t0 > self.budget:
            out = f"not run (past the {self.budget:.0f} s budget)"
        else:
            try:
                out = fn() or {}
            except Skipped as e:
                out = str(e)
            except torch.OutOfMemoryError:
                out = "OOM"
            except Exception as e:  # one failing cell must not lose the others' figures
                traceback.print_exc(file=sys.stderr)
                out = f"error: {type(e).__name__}"
        self.results.setdefault(model, {})[name] = out
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        shown = out if isinstance(out, str) else ", ".join(f"{k}={_short(v)}" for k, v in out.items())
        self.log(f"{model} {name}: {shown}")

    def config(self, **over: Any) -> EraseConfig:
        base = dict(
            resolution=self.s.resolution,
            steps=self.s.steps,
            batch_size=self.s.batch,
            seed=0,
            device=str(self.device),
            cache=False,
        )
        return EraseConfig(**(base | over))

    def erase(self, pipe: Any, imgs: list[Any], patch_file: bool = False, **over: Any) -> dict[str, Any]:
        from erasekit.erasing.unlearn import erase
        from erasekit.format.patchfile import save_patch

        cfg = self.config(**over)
        self.meter.start()
        t = time.perf_counter()
        rep = erase(pipe, [CONCEPT], [imgs], cfg, progress=self.meter.sync)
        self.meter.sync()
        out = {
            "loop_s": rep.loop_seconds,
            "wall_s": time.perf_counter() - t,
            "peak": self.meter.peak(),
            "resident": self.meter.resident,
            "timings": dict(rep.timings),
            "total_s": rep.total_seconds,
            "steps": rep.steps,
            "trained": rep.trained_parameters,
            "adam_bytes": rep.optimizer_bytes,
            "streamed_bytes": rep.streamed_bytes,
        }
        if patch_file:
            with tempfile.TemporaryDirectory(prefix="gpu_suite-") as tmp:
                t = time.perf_counter()
                path = save_patch(rep.patch, Path(tmp) / "p.safetensors")
                out["save_s"] = time.perf_counter() - t
                out["patch_bytes"] = path.stat().st_size
            ranks = [d.rank for d in rep.patch.manifest.deltas.values() if d.rank is not None]
            out["ranks"] = (min(ranks), max(ranks), len(ranks)) if ranks else None
            out["modules"] = len(rep.patch.manifest.deltas)
        return out

    def streamed_erase(self, pipe: Any, imgs: list[Any]) -> dict[str, Any]:
        """The 24 GB configuration: the defaults with ``offload: blocks``, on the pipeline held as ``erasekit erase
        --offload blocks`` holds it (:func:`held_for_24gb`)."""
        with held_for_24gb(pipe, self.device):
            return self.erase(pipe, imgs, offload="blocks")

    def generate(self, pipe: Any, steps: int | None) -> dict[str, Any]:
        """One image (``steps``: None for the family's default sampling), after a 1-step warm-up."""
        from erasekit.checkpoints.pipeline import denoiser_of
        from erasekit.judging.sampling import render, sampling_of, settings_line

        dtype = denoiser_of(pipe).dtype  # the encoders are fp32 and the denoiser may not be: autocast bridges them
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            render(pipe, f"a photo of a {CONCEPT}", seed=0, resolution=self.s.resolution, steps=1)  # warm-up
            self.meter.start()
            t = time.perf_counter()
            render(pipe, f"a photo of a {CONCEPT}", seed=0, resolution=self.s.resolution, steps=steps)
            self.meter.sync()
        return {
            "seconds": time.perf_counter() - t,
            "peak": self.meter.peak(),
            "resident": self.meter.resident,
            "settings": settings_line(sampling_of(pipe, steps), steps, None),
        }

    def reference(self, pipe: Any, imgs: list[Any]) -> dict[str, Any]:
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise Skipped("skipped: the published loop is SD1-only (one encoder, no SDXL added conditioning)")
        te = pipe.text_encoder
        originals = {k: v.clone() for k, v in te.state_dict().items()}
        latents = reference_latents(pipe, imgs, self.s)
        save_dir = Path(tempfile.mkdtemp(prefix="gpu_suite-"))
        try:
            if self.s.warmup:
                erase_speed.reference_loop(pipe, latents, CONCEPT, self.s.warmup, self.s.batch, 1, save_dir)
            te.load_state_dict(originals)
            self.meter.start()
            seconds = erase_speed.reference_loop(pipe, latents, CONCEPT, self.s.steps, self.s.batch, 0, save_dir)
            return {"loop_s": seconds, "peak": self.meter.peak(), "resident": self.meter.resident}
        finally:
            shutil.rmtree(save_dir, ignore_errors=True)
            te.load_state_dict(originals)
            te.requires_grad_(False)
            te.eval()
            for p in te.parameters():
                p.grad = None

    def cast(self, arch: str, pipe: Any, dtype: torch.dtype) -> bool:
        """UNet (or transformer) and VAE to ``dtype`` (the encoders stay fp32), as a cell: False if that failed."""
        from erasekit.checkpoints.pipeline import denoiser_of

        name = f"to {str(dtype).removeprefix('torch.')}"

        def to() -> dict[str, Any]:
            denoiser_of(pipe).to(dtype)
            pipe.vae.to(dtype)
            return {"dtype": str(dtype).removeprefix("torch.")}

        self.cell(arch, name, to)
        return not isinstance(self.results[arch][name], str)

    def run_model(self, arch: str, workdir: Path) -> None:
        box: dict[str, Any] = {}

        def build() -> dict[str, Any]:
            from erasekit.checkpoints.pipeline import denoiser_of

            t = time.perf_counter()
            if self.quick:
                pipe = tiny_pipeline(arch, self.device, workdir)
            elif arch in FLOW:
                pipe = full_size_flow_pipeline(arch, self.device)
            else:
                pipe = full_size_pipeline(arch, self.device)
            box["pipe"] = pipe
            return {
                "seconds": time.perf_counter() - t,
                "unet": millions(denoiser_of(pipe)),
                "encoders": " + ".join(millions(te) for te in encoders(pipe)),
                "vae": millions(pipe.vae),
            }

        self.cell(arch, "build", build)
        if "pipe" in box:
            (self.flow_stages if arch in FLOW else self.stages)(arch, box.pop("pipe"))
        gc.collect()  # the pipeline is gone: free its device memory before the next model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def stages(self, arch: str, pipe: Any) -> None:
        from erasekit._torch import compute_dtype

        s = self.s
        imgs = erase_speed.images(s.images, s.resolution)
        # stage auto: the UNet and VAE in the dtype `erasekit erase` loads them in (bf16 on a GPU)
        if not self.cast(arch, pipe, compute_dtype("auto", self.device)):
            return
        if s.warmup:
            self.cell(arch, "warm-up auto", lambda: self.erase(pipe, imgs, steps=s.warmup))
        self.cell(arch, "erase auto", lambda: self.erase(pipe, imgs, patch_file=True))
        self.cell(arch, "erase dense", lambda: self.erase(pipe, imgs, patch_file=True, rank="dense"))
        self.cell(arch, "erase checkpointing", lambda: self.erase(pipe, imgs, checkpointing=True))
        self.cell(arch, "generate auto", lambda: self.generate(pipe, s.gen_steps))
        # stage fp32: what the reference loop runs in
        if not self.cast(arch, pipe, torch.float32):
            return
        self.cell(arch, "reference", lambda: self.reference(pipe, imgs))
        if s.warmup:
            self.cell(arch, "warm-up fp32", lambda: self.erase(pipe, imgs, steps=s.warmup, dtype="fp32"))
        self.cell(arch, "erase fp32", lambda: self.erase(pipe, imgs, dtype="fp32"))
        self.cell(arch, "generate fp32", lambda: self.generate(pipe, s.gen_steps))

    def flow_stages(self, arch: str, pipe: Any) -> None:
        """FLUX.1 and SD3.x, held as ``erasekit erase`` holds them: a warm-up erase, then erasekit's defaults (T5
        trains rank-16 factors), the CLIPs alone (dense, ``rank auto``), one image with the family's sampling,
        the defaults with checkpointing, and last T5 trained densely (expected OOM on 80 GB)."""
        from erasekit._torch import compute_dtype

        s = self.s
        imgs = erase_speed.images(s.images, s.resolution)
        if not self.cast(arch, pipe, compute_dtype("auto", self.device)):
            return
        cells: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("erase auto", lambda: self.erase(pipe, imgs, patch_file=True)),
            ("erase streamed", lambda: self.streamed_erase(pipe, imgs)),
            ("erase clips", lambda: self.erase(pipe, imgs, patch_file=True, encoders=list(FLOW[arch].clips))),
            ("generate auto", lambda: self.generate(pipe, s.gen_steps if self.quick else None)),
            ("erase checkpointing", lambda: self.erase(pipe, imgs, checkpointing=True)),
            ("erase dense", lambda: self.erase(pipe, imgs, train="dense", rank="dense")),  # a 6 GB patch: not saved
        ]
        if s.warmup:
            cells.insert(0, ("warm-up auto", lambda: self.erase(pipe, imgs, steps=s.warmup)))
        for name, fn in cells:
            self.cell(arch, name, fn)
            drop_grads(pipe)  # what a cell cut by OOM left behind


# -- the table ------------------------------------------------------------------------------------


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    return str(v)


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


class Figures:
    """The cells' figures as the tables print them: a figure, or the cell's reason for having none."""

    def __init__(self, results: dict[str, dict[str, Any]], s: Setting) -> None:
        self.results = results
        self.s = s

    def get(self, m: str, cell: str, key: str) -> Any:
        """The figure, or the cell's reason for having none (a string)."""
        c = self.results[m].get(cell, "not run")
        return c if isinstance(c, str) else c.get(key)

    @staticmethod
    def fmt(value: Any, f: Callable[[Any], str]) -> str:
        return value if isinstance(value, str) else ("n/a (no CUDA)" if value is None else f(value))

    def ratio(self, m: str, a: tuple[str, str], b: tuple[str, str], suffix: str = "x") -> str:
        x, y = self.get(m, *a), self.get(m, *b)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y:
            return f"{x / y:.2f}{suffix}"
        return "n/a" if all(isinstance(v, (int, float)) or v is None for v in (x, y)) else "n/a (a cell has no figure)"

    def secs(self, m: str, cell: str, key: str = "loop_s") -> str:
        steps = self.s.steps
        return self.fmt(
            self.get(m, cell, key),
            lambda v: f"{v:.2f} s ({v / steps:.3f} s/step)" if key == "loop_s" else f"{v:.2f} s",
        )

    def size(self, m: str, cell: str) -> str:
        n = self.get(m, cell, "patch_bytes")
        if isinstance(n, str) or n is None:
            return self.fmt(n, str)
        ranks = self.get(m, cell, "ranks")
        extra = f"; rank {ranks[0]}-{ranks[1]} over {ranks[2]} weights" if ranks else "; dense"
        return f"{n:,} B ({n / 1e6:.1f} MB{extra})"

    def generated(self, m: str, cell: str) -> str:
        peak = self.get(m, cell, "peak")
        return peak if isinstance(peak, str) else f"{self.fmt(peak, gb)} ({self.get(m, cell, 'seconds'):.2f} s)"

    def parameters(self, m: str) -> str:
        """``860M / 123M + 695M / 84M``: the denoiser's, the encoders' and the VAE's (strings, not figures)."""
        built = self.results[m].get("build", "not run")
        return built if isinstance(built, str) else f"{built['unet']} / {built['encoders']} / {built['vae']}"

    def dtype(self, m: str) -> str:
        return next(
            (
                c["dtype"]
                for name, c in self.results[m].items()
                if name.startswith("to ") and isinstance(c, dict) and c["dtype"] != "float32"
            ),
            "float32",
        )

    def phases(self, models: list[str], cell: str) -> list[tuple[str, Callable[[str], str]]]:
        """One row per phase of ``EraseReport.timings`` that any model's ``cell`` reports."""
        names: list[str] = []
        for m in models:
            t = self.get(m, cell, "timings")
            if isinstance(t, dict):
                names += [p for p in t if p not in names]
        return [
            (p, lambda m, p=p: self.fmt(self.get(m, cell, "timings"), lambda t: f"{t[p]:.2f} s" if p in t else "-"))
            for p in names
        ]


def markdown(models: list[str], rows: list[tuple[str, Callable[[str], str]]]) -> str:
    lines = ["| figure | " + " | ".join(NAMES[m] for m in models) + " |", "|---|" + "---:|" * len(models)]
    for label, f in rows:
        lines.append(f"| {label} | " + " | ".join(f(m) for m in models) + " |")
    return "\n".join(lines)


def table(results: dict[str, dict[str, Any]], s: Setting) -> str:
    """The SD1.x and SDXL figures."""
    models = [m for m in UNET_MODELS if m in results]
    f = Figures(results, s)
    get, fmt, ratio, secs, size, generated, dtype = f.get, f.fmt, f.ratio, f.secs, f.size, f.generated, f.dtype

    rows: list[tuple[str, Callable[[str], str]]] = [
        ("parameters: UNet / text encoders / VAE", f.parameters),
        (
            f"**1. loop time, {s.steps} optimizer steps"
            f"{f' after {s.warmup} warm-up steps' if s.warmup else ', no warm-up'}**",
            lambda m: "",
        ),
        ("reference loop (published recipe, fp32)", lambda m: secs(m, "reference")),
        (
            "erasekit, dtype auto",
            lambda m: (
                secs(m, "erase auto") + (f" [{dtype(m)}]" if isinstance(get(m, "erase auto", "loop_s"), float) else "")
            ),
        ),
        (
            "speed-up auto vs reference (target >= 3x)",
            lambda m: ratio(m, ("reference", "loop_s"), ("erase auto", "loop_s")),
        ),
        ("erasekit, dtype fp32", lambda m: secs(m, "erase fp32")),
        ("speed-up fp32 vs reference", lambda m: ratio(m, ("reference", "loop_s"), ("erase fp32", "loop_s"))),
        ("bf16 gain (fp32 / auto)", lambda m: ratio(m, ("erase fp32", "loop_s"), ("erase auto", "loop_s"))),
        ("erasekit auto + checkpointing", lambda m: secs(m, "erase checkpointing")),
        (
            "checkpointing cost (its time / auto)",
            lambda m: ratio(m, ("erase checkpointing", "loop_s"), ("erase auto", "loop_s")),
        ),
        ("**2. a whole erase (auto, rank auto): EraseReport.timings**", lambda m: ""),
    ]
    rows += f.phases(models, "erase auto")
    rows += [
        ("total (EraseReport.total_seconds)", lambda m: secs(m, "erase auto", "total_s")),
        ("save_patch (not in the timings)", lambda m: secs(m, "erase auto", "save_s")),
        (f"**3. peak device memory ({s.resolution} px, batch {s.batch})**", lambda m: ""),
        (
            "resident before the runs (UNet+VAE in compute dtype, encoders fp32)",
            lambda m: fmt(get(m, "erase auto", "resident"), gb),
        ),
        ("erase, auto", lambda m: fmt(get(m, "erase auto", "peak"), gb)),
        (f"generate 1 image, {s.gen_steps} steps, same weights", lambda m: generated(m, "generate auto")),
        ("erase / generate (target <= 1.3x)", lambda m: ratio(m, ("erase auto", "peak"), ("generate auto", "peak"))),
        ("erase, auto + checkpointing (target SDXL < 12 GB)", lambda m: fmt(get(m, "erase checkpointing", "peak"), gb)),
        (
            "erase + checkpointing / generate",
            lambda m: ratio(m, ("erase checkpointing", "peak"), ("generate auto", "peak")),
        ),
        ("resident, all fp32", lambda m: fmt(get(m, "erase fp32", "resident"), gb)),
        ("erase, fp32", lambda m: fmt(get(m, "erase fp32", "peak"), gb)),
        ("generate, fp32", lambda m: generated(m, "generate fp32")),
        ("erase fp32 / generate fp32", lambda m: ratio(m, ("erase fp32", "peak"), ("generate fp32", "peak"))),
        ("reference loop, fp32", lambda m: fmt(get(m, "reference", "peak"), gb)),
        ("**4. patch size (written by save_patch, BF16)**", lambda m: ""),
        ("rank auto (default)", lambda m: size(m, "erase auto")),
        ("rank dense", lambda m: size(m, "erase dense")),
        ("auto / dense", lambda m: ratio(m, ("erase auto", "patch_bytes"), ("erase dense", "patch_bytes"), "")),
    ]
    return markdown(models, rows)


def flow_table(results: dict[str, dict[str, Any]], s: Setting) -> str:
    """The FLUX.1-dev and SD3.5-large figures."""
    models = [m for m in FLOW if m in results]
    f = Figures(results, s)
    get, fmt, secs = f.get, f.fmt, f.secs

    def trained(m: str, cell: str) -> str:
        n, state = get(m, cell, "trained"), get(m, cell, "adam_bytes")
        return fmt(n, lambda n: f"{n:,} parameters, Adam state {state / 1e6:,.1f} MB")

    def streamed(m: str) -> str:
        moved = get(m, "erase streamed", "streamed_bytes")
        return fmt(moved, lambda n: gb(n / s.steps)) if moved is not None else "n/a"

    def generated(m: str) -> str:
        peak = get(m, "generate auto", "peak")
        if isinstance(peak, str):
            return peak
        return f"{fmt(peak, gb)} ({get(m, 'generate auto', 'seconds'):.2f} s; {get(m, 'generate auto', 'settings')})"

    clips = {m: ",".join(FLOW[m].clips) for m in models}
    erases = [
        ("erase auto", "defaults (T5 trains rank-16 factors)"),
        ("erase streamed", "defaults, --offload blocks, encoders bf16 (the 24 GB configuration)"),
        ("erase clips", "--encoders te1 (FLUX) / te1,te2 (SD3): CLIPs only, dense, rank auto"),
        ("erase checkpointing", "defaults + checkpointing"),
        ("erase dense", "train dense, rank dense (T5 dense in Adam; OOM expected on 80 GB)"),
    ]
    rows: list[tuple[str, Callable[[str], str]]] = [
        ("parameters: transformer / text encoders / VAE", f.parameters),
        ("build on the device (seconds)", lambda m: fmt(get(m, "build", "seconds"), lambda v: f"{v:.1f} s")),
        ("erase without T5 (--encoders)", lambda m: clips[m]),
        (
            f"**1. loop time, {s.steps} optimizer steps"
            f"{f' after {s.warmup} warm-up steps' if s.warmup else ', no warm-up'} [{' / '.join(map(f.dtype, models))}]**",
            lambda m: "",
        ),
        *[(label, lambda m, c=cell: secs(m, c)) for cell, label in erases],
        ("**2. a whole erase (defaults): EraseReport.timings**", lambda m: ""),
        *f.phases(models, "erase auto"),
        ("total (EraseReport.total_seconds)", lambda m: secs(m, "erase auto", "total_s")),
        ("save_patch (not in the timings)", lambda m: secs(m, "erase auto", "save_s")),
        (f"**3. peak device memory ({s.resolution} px, batch {s.batch})**", lambda m: ""),
        (
            "resident before the runs (transformer, VAE and encoders in compute dtype)",
            lambda m: fmt(get(m, "erase auto", "resident"), gb),
        ),
        (
            "resident before the 24 GB configuration's erase (blocks in CPU memory)",
            lambda m: fmt(get(m, "erase streamed", "resident"), gb),
        ),
        *[(label, lambda m, c=cell: fmt(get(m, c, "peak"), gb)) for cell, label in erases],
        ("moved to the device a step (--offload blocks: the blocks, twice)", streamed),
        ("generate 1 image, the family's default sampling", generated),
        ("erase (defaults) / generate", lambda m: f.ratio(m, ("erase auto", "peak"), ("generate auto", "peak"))),
        ("**4. what trains (Adam)**", lambda m: ""),
        *[(label, lambda m, c=cell: trained(m, c)) for cell, label in erases],
        ("**5. patch size (written by save_patch, BF16)**", lambda m: ""),
        ("defaults (T5 factors, CLIP factors)", lambda m: f.size(m, "erase auto")),
        ("CLIPs only (rank auto)", lambda m: f.size(m, "erase clips")),
    ]
    return markdown(models, rows)


def environment(device: torch.device) -> list[str]:
    import diffusers
    import transformers

    lines = [f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"]
    if device.type == "cuda":
        lines.append(
            f"device {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
            f"bf16 {torch.cuda.is_bf16_supported()}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
            f"TF32 cuDNN {torch.backends.cudnn.allow_tf32}"
        )
    else:
        lines.append(f"device cpu, torch threads {torch.get_num_threads()}")
    return lines


def models_arg(text: str) -> list[str]:
    """``--only flux,sd3``: the models, in the order given."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown model {', '.join(unknown) or '(none)'}; give some of {', '.join(MODELS)}"
        )
    return list(dict.fromkeys(names))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default), cuda:N or cpu; --quick defaults to cpu")
    ap.add_argument("--quick", action="store_true", help="the tiny test pipelines, small images, few steps")
    ap.add_argument(
        "--only",
        type=models_arg,
        default=None,
        help=f"models, comma-separated, of {', '.join(MODELS)} (default: sd1,sdxl on a GPU; --quick: all four)",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds after which cells are no longer started (default 270; --quick: none)",
    )
    args = ap.parse_args()
    device = torch.device(args.device or ("cpu" if args.quick else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; use --quick (CPU) or run it where a GPU is", file=sys.stderr)
        return 2
    quiet_libraries()
    s = QUICK if args.quick else PAPER
    budget = args.budget if args.budget is not None else (float("inf") if args.quick else 270.0)
    suite = Suite(device, s, budget, args.quick)
    suite.log(f"device {device}, setting {s}")
    with tempfile.TemporaryDirectory(prefix="gpu_suite-") as tmp:
        for arch in args.only or (MODELS if args.quick else UNET_MODELS):
            suite.run_model(arch, Path(tmp))
    what = "tiny test pipelines (smoke test: figures meaningless)" if args.quick else "random weights"
    latents = "" if args.quick else f" ({s.resolution // 8}x{s.resolution // 8} latents)"
    print(
        f"\n{s.resolution} px images{latents}, batch {s.batch}, {s.steps} optimizer steps, {s.images} training "
        f"images, one concept; {what}\n"
    )
    if any(m in suite.results for m in UNET_MODELS):
        print(table(suite.results, s))
        print()
    if any(m in suite.results for m in FLOW):
        print(flow_table(suite.results, s))
        print()
    for line in environment(device):
        print(line)
    print(f"wall time {time.perf_counter() - suite.t0:.0f} s")
    print(f"command: python {shlex.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
