"""Few-shot concept erasing by gradient ascent through a frozen UNet into the text encoder's FFN layers.

Method: Fuchi & Takagi, "Erasing Concepts from Text-to-Image Diffusion Models with Few-shot Unlearning"
(BMVC 2024). The loop, top to bottom:

1. encode each training image once with the frozen VAE (cached on disk by image bytes);
2. each step: a batch of latents, uniform timesteps, Gaussian noise, a prompt from the templates;
3. loss = MSE(UNet(noisy, t, TE(prompt)), target) with target = noise (epsilon) or velocity (v-prediction);
4. *ascend* that loss (minimise its negative) with Adam, updating only TE FFN fc1/fc2 weights and biases (with
   ``train: factors``, low-rank factors of each weight's change and the biases' deltas: :mod:`erasekit.erasing.factors`);
5. the patch is the difference of those tensors before and after (or the trained factors).

What makes it faster than the reference script at the same number of optimizer steps: only the FFN
tensors require gradients (no weight gradients for the UNet, attention or embeddings, and no backward
pass below the lowest trained layer), no per-epoch checkpoint writes, latents encoded once and cached,
SDPA attention, and bf16 autocast for the frozen UNet on devices that compute bf16 natively (GPUs; CPUs
with AVX512-BF16 or AMX). With ``train: factors`` the frozen text encoders are held in that dtype too
(:func:`erasekit._torch.encoder_dtype`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ErasekitError, NonFiniteError
from ..families.base import Family
from ..format.erase_config import EraseConfig
from .compress import Compaction, linear_modules
from .conditioning import Conditioner, check_concepts, trainable
from .denoising import Denoiser, Draws, make_denoiser, normalised_latents
from .erase_patch import Trained, build_patch, memory_fingerprints
from .factors import Factors
from .recipes import Objective, Step, make_recipe
from .surgery import surgery_grads
from .training_images import encode_images, images_digest, training_item


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    seconds: float


@dataclass
class EraseReport:
    concepts: list[str]
    output: str | None
    steps: int
    loss_start: float  # the loop's denoising loss, mean of its first steps (a fifth of them, at most 10) ...
    loss_end: float  # ... and of its last ones: gradient ascent raises it
    losses: list[float]
    forget_loss_before: float | None  # with forget_check: the loss on fixed draws before and after the erase
    forget_loss_after: float | None
    loop_seconds: float
    total_seconds: float
    patch_bytes: int
    num_images: int
    device: str
    top_layers: list[tuple[str, float]] = field(default_factory=list)  # (module, |delta W|), largest first
    rank_kept: float | None = None  # low-rank: the share of the weight deltas' squared norm the patch keeps
    output_error: float = 0.0  # low-rank: the largest of output_errors
    # low-rank: per output the UNet reads ("hidden", SDXL's "pooled"), how far the stored deltas move it from
    # where the trained ones put it, relative to how far those moved it
    output_errors: dict[str, float] = field(default_factory=dict)
    # per output, how far the patch moves the empty prompt's (|after - before| / |before|): classifier-free
    # guidance's unconditional branch, in every image
    empty_prompt_drift: dict[str, float] = field(default_factory=dict)
    patch: Any = None  # the Patch object (not serialised)
    ui: list[str] = field(default_factory=list)  # how to load the written patch in ComfyUI and A1111
    sources: dict[str, str] = field(
        default_factory=dict
    )  # setting -> "user", "model" or "native" (the rest are defaults)
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds: where the erase's time went
    # what Adam trained: its parameters (every FFN weight and bias, or with train: factors the factors and the
    # biases) and the bytes of its state after the loop (two float32 moments a parameter, and a step count a tensor)
    trained_parameters: int = 0
    optimizer_bytes: int = 0
    # offload: blocks: the bytes of the denoiser's blocks moved to the device (twice their size an optimizer step:
    # for the forward pass and again for the backward; once more for each pass without gradients)
    streamed_bytes: int = 0
    # the text encoders' weights as the loop held them: their bytes (every encoder's parameters, trained and frozen)
    # and their dtype: "fp32" where they train (train: dense), under train: factors the dtype the loop computes in
    encoder_bytes: int = 0
    encoder_dtype: str = "fp32"


class Clock:
    """Seconds per phase, in the order the phases ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - t, 4)


def _total_steps(n_images: int, config: EraseConfig) -> int:
    return config.steps if config.steps is not None else config.epochs * -(-n_images // config.batch_size)


def _batches(n_images: int, config: EraseConfig, gen: Any) -> Iterator[list[int]]:
    """Batches of image indices: shuffled epochs of ``batch_size``, as a DataLoader(shuffle=True) would. Each
    epoch's shuffle is drawn when the epoch begins, so the first k steps of a run are those of any longer run
    with the same settings (``--steps 20`` is where ``--steps 80`` was after 20 steps)."""
    import torch

    total, done = _total_steps(n_images, config), 0
    while done < total:
        perm = torch.randperm(n_images, generator=gen).tolist()
        for i in range(0, n_images, config.batch_size):
            if done == total:
                return
            done += 1
            yield perm[i : i + config.batch_size]


def _gather_images(
    images: Sequence[Sequence[Any]], resolution: int
) -> tuple[list[tuple[Any, bytes]], list[int], list[str | None]]:
    """(training image, bytes) of every image, the concept each belongs to, and its own caption if it has one."""
    loaded, owner, captions = [], [], []
    for ci, group in enumerate(images):
        for item in group:
            caption = None
            if isinstance(item, tuple):  # (image, caption): the image's own caption replaces the templates
                item, caption = item
            loaded.append(training_item(item, resolution))
            owner.append(ci)
            captions.append(caption)
    return loaded, owner, captions


def _window_mean(losses: list[float], end: bool) -> float:
    """Mean of the first (or last) fifth of the losses, at most 10 of them: single steps are too noisy to compare."""
    if not losses:
        return float("nan")
    w = max(1, min(10, len(losses) // 5))
    part = losses[-w:] if end else losses[:w]
    return sum(part) / len(part)


@contextmanager
def _gradient_checkpointing(unet: Any, on: bool) -> Iterator[None]:
    """Recompute the frozen UNet's activations in the backward pass instead of keeping them (less memory, more
    time); the UNet's own setting is given back."""
    was = bool(getattr(unet, "is_gradient_checkpointing", False))
    if on and not was:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if on and not was:
            unet.disable_gradient_checkpointing()


def erase(
    pipe: Any,
    concepts: Sequence[str],
    images: Sequence[Sequence[Any]],
    config: EraseConfig,
    *,
    progress: Callable[[StepInfo], None] | None = None,
    base_files: Any = None,
    after: Sequence[Any] = (),
) -> EraseReport:
    """Erase ``concepts`` from ``pipe`` (a loaded SD1.x, SD2.x or SDXL pipeline) using ``images[i]`` for concept i.

    ``images`` holds PIL images or paths, or ``(image, caption)`` pairs whose caption is used instead of the
    templates (the built-in world knows what it drew). Returns an :class:`EraseReport` whose ``patch`` is an unsaved
    :class:`~erasekit.format.patchfile.Patch`; the pipeline is given back as it was (weights, dtypes, flags, modes).
    ``base_files`` (a detected :class:`~erasekit.checkpoints.layouts.Checkpoint`) makes the base fingerprints those
    of the files on disk, so the patch applies "exact" to them; where patches are applied to them in place, those
    of the files below them, and the patch records them as made ``after`` them (as with ``after``). ``after``: patches (:class:`~erasekit.format.patchfile.Patch`)
    the new one will be stacked on, applied in memory for the erase: it learns what is left to erase with them in
    place, and records them (``after`` in its settings). Its base is still the model without them.
    ``config.train: auto`` is decided here as :meth:`~erasekit.format.erase_config.EraseConfig.for_kinds` decides it.
    ``config.offload: blocks`` (FLUX.1, SD3.x) streams the transformer's blocks to the device of its other modules
    from wherever they are (:mod:`erasekit.erasing.streaming`; kept in CPU memory they never fill the device).
    """
    import torch

    from .._torch import encoder_dtype, held_in, kept_as_found, native_bf16
    from ..checkpoints.in_place import applied_in_place
    from ..checkpoints.memory import patches_applied
    from ..checkpoints.pipeline import denoiser_of
    from ..families import of_pipeline
    from ..format.patchfile import source_date
    from .streaming import streamed

    t_start = time.perf_counter()
    clock = Clock()
    if not concepts:
        raise ErasekitError("no concept given", "name at least one concept", option="concepts")
    if len(images) != len(concepts):
        raise ErasekitError(
            f"{len(concepts)} concepts but {len(images)} image sets", "give one image set per concept", option="images"
        )
    unet = denoiser_of(pipe)  # the UNet, or FLUX.1's and SD3.x's transformer
    device = unet.device  # where its modules outside the streamed blocks are (offload: blocks)
    streamed_blocks = offloaded_blocks(config.offload, of_pipeline(pipe))
    cond_of = Conditioner(pipe, config.resolution, config.encoders)
    for _, tok in cond_of.all.values():
        check_concepts(tok, concepts)
    with clock("images"):
        loaded, owner, captions = _gather_images(images, config.resolution)
    if len(loaded) < config.batch_size:
        raise ErasekitError(
            f"{len(loaded)} training images but a batch size of {config.batch_size}",
            "add images or lower the batch size",
            option="batch_size",
        )
    images_sha = images_digest([d for _, d in loaded])

    gen = torch.Generator().manual_seed(config.seed)  # every random choice of the run, in a fixed order
    flips = [bool(torch.rand((), generator=gen) < 0.5) if config.flip else False for _ in loaded]
    with clock("encode"):
        mean, std = encode_images(pipe, loaded, config, flips)
    latents = normalised_latents(pipe, mean + std * torch.randn(mean.shape, generator=gen))  # sampled once
    amp_dtype = {"bf16": torch.bfloat16}.get(
        config.dtype, torch.bfloat16 if (config.dtype == "auto" and native_bf16(device)) else None
    )
    denoiser = make_denoiser(pipe, latents.to(device), amp_dtype)
    draws = Draws(
        [config.templates_for(c) for c in concepts],
        concepts,
        owner,
        captions,
        denoiser.timesteps,
        tuple(latents.shape[1:]),
    )
    config = config.for_kinds(_kinds(cond_of))  # train: auto decided (factors where a T5 trains)
    encoders = {slot: te for slot, (te, _) in cond_of.all.items()}
    held = encoder_dtype(config.train, config.dtype, device)  # float32 where they train, or frozen in bf16
    with (
        kept_as_found((unet, pipe.vae, *encoders.values())),
        _gradient_checkpointing(unet, config.checkpointing and not streamed_blocks),  # streaming recomputes already
        streamed(unet, streamed_blocks, device) as stream,
    ):
        for module in (unet, pipe.vae, *encoders.values()):
            module.requires_grad_(False)
        params = [
            p
            for slot, te in cond_of.trained.items()
            for p in trainable(slot, te, config.layers if config.layers is not None else cond_of.useful_layers(slot))
        ]
        # the patch is for the weights as found: before the earlier patches and any conversion
        trained = Trained(params, {}, memory_fingerprints(params) if base_files is None else {})
        trained.trained_factors = _factors(config, cond_of, params)
        # the encoders held in their dtype; an erase after other patches learns on top of them; trained factors act
        # through hooks while it runs
        with held_in(encoders.values(), held), patches_applied(pipe, after), _attached(trained.trained_factors):
            encoder_bytes = sum(p.numel() * p.element_size() for te in encoders.values() for p in te.parameters())
            trained.keep_originals()
            try:
                check = (
                    _ForgetCheck(config, denoiser, draws, cond_of, len(loaded), clock) if config.forget_check else None
                )
                with clock(
                    "compress"
                ):  # what the encoders give the UNet before the erase, to measure the stored form on
                    compaction = (
                        Compaction(config, concepts, captions, cond_of, device)
                        if config.rank != "dense" and config.train == "dense"
                        else None
                    )
                empty = _EmptyPrompt(cond_of, device)
                recipe = make_recipe(config, list(concepts), device)
                recipe.prepare(lambda prompts: cond_of(prompts, device), draws.every_prompt())
                with clock("loop"):
                    losses, conflicts, adam = _loop(
                        config, trained, recipe, denoiser, draws, cond_of, gen, len(loaded), progress
                    )
                forget_after = check.after() if check else None
                trained.take_deltas()
                output_errors: dict[str, float] = {}
                if compaction:
                    with clock("compress"):
                        trained.factors, output_errors = compaction.factors(trained.params, trained.originals)
                drift = empty.drift()  # with the deltas as stored (before their rounding to the patch dtype)
                ran = {
                    "steps_run": len(losses),
                    "stopped_early": recipe.should_stop(losses),
                    "prediction_type": denoiser.prediction_type,
                    "autocast": "bf16" if amp_dtype == torch.bfloat16 else "fp32",
                    "empty_prompt_drift": _rounded(drift),
                }
                if compaction:
                    ran |= {
                        "output_error": round(max(output_errors.values()), 6),
                        "output_errors": _rounded(output_errors),
                    }
                earlier = applied_in_place(base_files) if base_files is not None else []
                earlier += [{"patch_id": p.patch_id, "title": p.title} for p in after]
                ran |= {"after": earlier} if earlier else {}
                if config.surgery:  # the share of (step, tensor) gradients that conflicted and were projected
                    ran["surgery_conflicts"] = round(conflicts, 4)
                with clock("patch"):
                    patch = build_patch(
                        config,
                        concepts,
                        cond_of,
                        trained,
                        base_files,
                        ran,
                        {
                            "images_sha256": images_sha,
                            "num_images": len(loaded),
                            "duration_s": None if source_date() else round(clock.seconds["loop"], 3),
                        },
                    )
            finally:  # the trained values back; kept_as_found gives back dtypes, flags and modes
                trained.restore()

    norms = trained.weight_norms(patch.manifest.deltas)
    kept = (
        sum(trained.factors[m].kept * n**2 for m, n in norms.items()) / (sum(n**2 for n in norms.values()) or 1.0)
        if compaction
        else None
    )
    return EraseReport(
        list(concepts),
        None,
        len(losses),
        _window_mean(losses, end=False),
        _window_mean(losses, end=True),
        losses,
        check.before if check else None,
        forget_after,
        clock.seconds["loop"],
        time.perf_counter() - t_start,
        0,
        len(loaded),
        str(device),
        sorted(norms.items(), key=lambda x: -x[1])[:5],
        kept,
        max(output_errors.values(), default=0.0),
        output_errors,
        drift,
        patch,
        timings=clock.seconds,
        trained_parameters=adam[0],
        optimizer_bytes=adam[1],
        streamed_bytes=stream.bytes_moved if stream else 0,
        encoder_bytes=encoder_bytes,
        encoder_dtype="bf16" if held == torch.bfloat16 else "fp32",
    )


def _loop(
    config: EraseConfig,
    trained: Trained,
    recipe: Any,
    denoiser: Denoiser,
    draws: Draws,
    cond_of: Conditioner,
    gen: Any,
    n_images: int,
    progress: Callable[[StepInfo], None] | None,
) -> tuple[list[float], float, tuple[int, int]]:
    """The optimizer steps: each draws a batch, encodes its prompts and the recipe's in one text-encoder pass,
    runs the UNet, and minimises the recipe's objective with Adam, until the schedule ends or the recipe stops.
    The losses, the share of (step, tensor) gradients in which surgery removed a conflict, and (the parameters
    Adam trained, the bytes of its state)."""
    import torch

    params = trained.optimized()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(
        params,
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        fused=True if params[0].device.type == "cuda" else None,
    )  # CUDA: one kernel, no copies
    device = denoiser.unet.device
    total = _total_steps(n_images, config)
    losses: list[float] = []
    per_step: list[int] = []  # conflicting tensors, per step that updated the encoders
    t0 = time.perf_counter()
    for step, idx in enumerate(_batches(n_images, config, gen)):
        idx = [i for i in idx for _ in range(config.draws)]  # several noise draws per image
        t, noise, prompts = draws(idx, gen)
        cond, added = cond_of(prompts + recipe.step_prompts(gen), device)
        k = len(prompts)
        prediction = denoiser.predict(idx, t, noise, _rows(cond, added, slice(None, k)))
        loss = prediction.loss
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"the loss became non-finite at step {step + 1}; no patch was written",
                "lower the learning rate or the number of steps",
                option="lr",
            )
        state = Step(prediction, prompts, _rows(cond, added, slice(k, None)))
        per_step += _update(opt, params, recipe.objective(state), config.surgery)
        recipe.after_step(state)
        losses.append(loss.item())
        if progress:
            progress(StepInfo(step + 1, total, losses[-1], time.perf_counter() - t0))
        if recipe.should_stop(losses):
            break
    return losses, sum(per_step) / max(1, len(per_step) * len(params)), _adam_size(opt)


def _adam_size(opt: Any) -> tuple[int, int]:
    """The parameters ``opt`` trains and the bytes of the state it holds for them."""
    held = [t for state in opt.state.values() for t in state.values() if hasattr(t, "element_size")]
    trains = sum(p.numel() for group in opt.param_groups for p in group["params"])
    return trains, sum(t.numel() * t.element_size() for t in held)


def offloaded_blocks(offload: str, fam: Family | None) -> tuple[str, ...]:
    """The block lists of ``fam``'s denoiser that the ``offload`` setting streams (none for ``none``); refused for a
    family whose denoiser is not streamed (a UNet: it fits a GPU whole)."""
    if offload == "none":
        return ()
    if fam is None or not fam.streamed_blocks:
        what = f"{fam.title}'s UNet fits a GPU whole" if fam is not None else "this model's denoiser is not streamed"
        raise ErasekitError(
            f"offload {offload} streams the blocks of FLUX.1's and SD3.x's transformer; {what}",
            "leave offload at none (checkpointing saves memory on a UNet)",
            option="offload",
        )
    return fam.streamed_blocks


def _factors(config: EraseConfig, cond_of: Conditioner, params: list[tuple[str, str, Any]]) -> Factors | None:
    """With ``train: factors``, the factors of the trained weights and the deltas of the trained biases (else
    None)."""
    if config.train != "factors":
        return None
    return Factors(
        linear_modules(cond_of, {m: p for m, kind, p in params if kind == "weight"}),
        int(config.rank),
        config.seed + 3,  # + 1: the forget check's draws, + 2: compression's rows
        [m for m, kind, _ in params if kind == "bias"],
    )


def _kinds(cond_of: Conditioner) -> set[str]:
    """The kinds of the encoders the erase trains ("clip", "t5")."""
    from ..families import family

    return {family(cond_of.arch).slot(s).encoder.kind.name for s in cond_of.trained}


@contextmanager
def _attached(factors: Factors | None) -> Iterator[None]:
    """Within the block, the layers whose factors train compute with them (nothing without factors)."""
    if factors is None:
        yield
        return
    with factors.attached():
        yield


def _rows(cond: Any, added: dict[str, Any] | None, rows: slice) -> tuple[Any, dict[str, Any] | None]:
    """Those rows of a conditioning (hidden states and SDXL's added conditioning)."""
    return cond[rows], ({n: v[rows] for n, v in added.items()} if added else None)


def _update(opt: Any, params: list[Any], objective: Objective, surgery: float | None) -> list[int]:
    """One Adam step on ``objective`` (none while its erasing term is None: then ``[]``); with ``surgery``, on the
    gradients :func:`~erasekit.erasing.surgery.surgery_grads` makes. ``[the number of tensors whose gradients conflicted]``."""
    if objective.erase is None:
        return []
    conflicts = 0
    if surgery and objective.hold is not None:
        conflicts = surgery_grads(params, objective.erase, objective.hold, surgery, objective.hold_counts)
    elif objective.hold is None or not objective.hold_counts:
        objective.erase.backward()
    else:
        (objective.erase + objective.hold).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)  # frees the gradients now rather than at the next backward
    return [conflicts]


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in values.items()}


class _EmptyPrompt:
    """The empty prompt's outputs before the erase, to tell how far the erase moved them."""

    def __init__(self, cond_of: Conditioner, device: Any) -> None:
        self.cond_of, self.device = cond_of, device
        self.before = self._outputs()

    def _outputs(self) -> dict[str, Any]:
        import torch

        from .conditioning import encoder_outputs

        with torch.no_grad():
            return {name: out.float().cpu() for name, out in encoder_outputs(self.cond_of([""], self.device)).items()}

    def drift(self) -> dict[str, float]:
        from .conditioning import output_drift

        return output_drift(self.before, self._outputs())


class _ForgetCheck:
    """``--forget-check``: the denoising loss on a fixed set of draws (4 per image), before and after the loop."""

    def __init__(
        self, config: EraseConfig, denoiser: Denoiser, draws: Draws, cond_of: Conditioner, n_images: int, clock: Clock
    ) -> None:
        import torch

        gen = torch.Generator().manual_seed(config.seed + 1)
        self.every = list(range(n_images))
        self.fixed = [draws(self.every, gen) for _ in range(4)]
        self.denoiser, self.cond_of, self.clock = denoiser, cond_of, clock
        self.before = self._measure()

    def _measure(self) -> float:
        import torch

        device = self.denoiser.unet.device
        with self.clock("forget_check"), torch.no_grad():
            return float(
                np.mean(
                    [self.denoiser.loss(self.every, t, n, self.cond_of(p, device)).item() for t, n, p in self.fixed]
                )
            )

    def after(self) -> float:
        return self._measure()
