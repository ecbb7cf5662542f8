"""The denoising loss the erase loop differentiates: the frozen denoiser's prediction for noised training latents
under a conditioning, against its target (the noise, or the velocity for v-prediction models; for the
flow-matching transformers of FLUX.1 and SD3.x, the velocity from the image to the noise: :class:`FlowMatching`), and
the random draws (timesteps, noise, prompts) each step takes, all from one seeded generator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ErasekitError


def make_denoiser(pipe: Any, latents: Any, amp_dtype: Any) -> Denoiser:
    """The denoiser of a loaded pipeline, with the objective its family trains with: :class:`FlowMatching` for a
    flow-matching family (``Family.flow_matching``: FLUX.1, SD3.x), else :class:`Denoiser`."""
    from ..checkpoints.pipeline import denoiser_of
    from ..families import of_pipeline

    family = of_pipeline(pipe)
    cls = FlowMatching if family is not None and family.flow_matching else Denoiser
    return cls(denoiser_of(pipe), pipe.scheduler.config, latents, amp_dtype)


def normalised_latents(pipe: Any, sample: Any) -> Any:
    """VAE latents as the denoiser reads them: times the VAE's ``scaling_factor``, after subtracting its
    ``shift_factor`` where a flow-matching family's VAE has one (FLUX.1 0.1159, SD3.x 0.0609)."""
    from ..families import of_pipeline

    family, config = of_pipeline(pipe), pipe.vae.config
    shift = getattr(config, "shift_factor", None) if family is not None and family.flow_matching else None
    return (sample - shift if shift else sample) * config.scaling_factor


class Denoiser:
    """MSE(UNet(noisy latents, t, conditioning), target) for rows of ``latents``."""

    def __init__(self, unet: Any, scheduler_config: Any, latents: Any, amp_dtype: Any) -> None:
        from diffusers import DDPMScheduler

        self.unet, self.latents, self.amp_dtype = unet, latents, amp_dtype
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ErasekitError(
                f"the model predicts {self.prediction_type!r}", "erase supports epsilon and v_prediction models"
            )
        self.timesteps = self.scheduler.config.num_train_timesteps

    def loss(self, idx: list[int], t: Any, noise: Any, conditioning: tuple[Any, dict[str, Any] | None]) -> Any:
        return self.predict(idx, t, noise, conditioning).loss

    def predict(
        self, idx: list[int], t: Any, noise: Any, conditioning: tuple[Any, dict[str, Any] | None]
    ) -> Prediction:
        """The UNet's prediction for rows ``idx`` of the latents noised with ``noise`` at timesteps ``t``."""
        device = self.unet.device
        x0 = self.latents[idx]
        noise, t = noise.to(device), t.to(device)
        noisy, target = self.noised(x0, noise, t)
        return Prediction(self, noisy, t, target, self.run(noisy, t, conditioning))

    def noised(self, x0: Any, noise: Any, t: Any) -> tuple[Any, Any]:
        """The latents ``x0`` noised with ``noise`` at ``t``, and the training target there."""
        noisy = self.scheduler.add_noise(x0, noise, t)
        return noisy, noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, noise, t)

    def run(self, noisy: Any, t: Any, conditioning: tuple[Any, dict[str, Any] | None]) -> Any:
        """The frozen UNet's output (float32) for ``noisy`` latents at ``t`` under ``conditioning``."""
        import torch

        unet = self.unet
        cond, added = conditioning
        if added is not None:
            added = {k: v.to(unet.dtype) for k, v in added.items()}
        with torch.autocast(unet.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return unet(noisy.to(unet.dtype), t, cond.to(unet.dtype), added_cond_kwargs=added).sample.float()

    def clean(self, noisy: Any, t: Any, out: Any) -> Any:
        """The clean latents that the UNet's output ``out`` predicts for ``noisy`` at ``t``."""
        a = self.scheduler.alphas_cumprod.to(noisy.device)[t].float().view(-1, 1, 1, 1)
        if self.prediction_type == "epsilon":
            return (noisy - (1 - a).sqrt() * out) / a.sqrt()
        return a.sqrt() * noisy - (1 - a).sqrt() * out


class FlowMatching(Denoiser):
    """The rectified-flow objective FLUX.1 and SD3.x are trained with, as diffusers' train_dreambooth_flux.py and
    train_dreambooth_sd3.py compute it: ``noisy = (1 - sigma) * x0 + sigma * noise``, target ``noise - x0``. A step's
    ``t`` is an index into the scheduler's 1000 training timesteps, drawn uniformly (their weighting "none"); the
    table carries the scheduler's static shift (SD3.x's 3.0), not FLUX.1-dev's resolution-dependent one, as in those
    scripts. SD3.x's transformer takes that timestep (0-1000); FLUX.1's takes it over 1000, its latents packed 2x2
    into tokens with their position ids, and, where it has a guidance embedding (dev, not schnell), the fixed
    guidance :data:`GUIDANCE`."""

    GUIDANCE = 3.5  # FLUX.1-dev's recommended guidance, which the dreambooth script trains with

    def __init__(self, transformer: Any, scheduler_config: Any, latents: Any, amp_dtype: Any) -> None:
        import inspect

        from diffusers import FlowMatchEulerDiscreteScheduler

        self.unet, self.latents, self.amp_dtype = transformer, latents, amp_dtype
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)  # its training table
        self.prediction_type = "flow_matching"
        self.timesteps = self.scheduler.config.num_train_timesteps
        self.packed = "img_ids" in inspect.signature(transformer.forward).parameters  # FLUX.1's

    def _sigmas(self, t: Any) -> Any:
        return self.scheduler.sigmas.to(t.device)[t].float().view(-1, 1, 1, 1)

    def noised(self, x0: Any, noise: Any, t: Any) -> tuple[Any, Any]:
        sigma = self._sigmas(t)
        return (1 - sigma) * x0 + sigma * noise, noise - x0

    def run(self, noisy: Any, t: Any, conditioning: tuple[Any, dict[str, Any] | None]) -> Any:
        """The frozen transformer's velocity (float32, in the latents' shape) for ``noisy`` at ``t``."""
        import torch

        transformer = self.unet
        cond, added = conditioning
        assert added is not None, "FLUX.1 and SD3.x read a pooled embedding"
        dtype = transformer.dtype
        inputs = {
            "encoder_hidden_states": cond.to(dtype),
            "pooled_projections": added["text_embeds"].to(dtype),
            "return_dict": False,
        }
        timestep = self.scheduler.timesteps.to(t.device)[t]
        with torch.autocast(transformer.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            if not self.packed:
                return transformer(hidden_states=noisy.to(dtype), timestep=timestep, **inputs)[0].float()
            return self._run_packed(noisy, timestep / 1000, cond.shape[1], inputs)

    def _run_packed(self, noisy: Any, timestep: Any, text_tokens: int, inputs: dict[str, Any]) -> Any:
        """FLUX.1: the latents as 2x2 patches, a token each, with their position ids (and zeros for the text's)."""
        import torch
        from diffusers import FluxPipeline

        transformer, (b, c, h, w) = self.unet, noisy.shape
        dtype, device = transformer.dtype, noisy.device
        packed = FluxPipeline._pack_latents(noisy.to(dtype), b, c, h, w)
        guidance = torch.full((b,), self.GUIDANCE, device=device) if transformer.config.guidance_embeds else None
        out = transformer(
            hidden_states=packed,
            timestep=timestep,
            guidance=guidance,
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype),
            txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype),
            **inputs,
        )[0]
        return FluxPipeline._unpack_latents(out, h, w, 1).float()  # a scale factor of 1: h, w are the latents'

    def clean(self, noisy: Any, t: Any, out: Any) -> Any:
        """The clean latents a velocity ``out`` predicts: ``noisy - sigma * out``."""
        return noisy - self._sigmas(t) * out


@dataclass
class Prediction:
    """One UNet pass of a step: the noised latents, their timesteps, the training target and the UNet's output."""

    denoiser: Denoiser
    noisy: Any
    t: Any
    target: Any
    out: Any

    @property
    def loss(self) -> Any:
        import torch.nn.functional as F

        return F.mse_loss(self.out, self.target.float())

    def clean(self) -> Any:
        """The clean latents the output predicts (differentiable)."""
        return self.denoiser.clean(self.noisy, self.t, self.out)

    def frozen(self, conditioning: tuple[Any, dict[str, Any] | None]) -> Prediction:
        """The same noised latents through the UNet under another conditioning, without gradients."""
        import torch

        with torch.no_grad():
            out = self.denoiser.run(self.noisy, self.t, conditioning)
        return Prediction(self.denoiser, self.noisy, self.t, self.target, out)


class Draws:
    """Each step's random choices for a batch of image indices: timesteps, noise, and a prompt per image (its own
    caption, or a template with its concept's name)."""

    def __init__(
        self,
        templates: list[list[str]],
        concepts: Sequence[str],
        owner: list[int],
        captions: list[str | None],
        timesteps: int,
        latent_shape: tuple[int, ...],
    ) -> None:
        self.templates, self.concepts, self.owner, self.captions = templates, concepts, owner, captions
        self.timesteps, self.latent_shape = timesteps, latent_shape

    def every_prompt(self) -> list[str]:
        """Every prompt a draw can give, in a fixed order."""
        named = {self.concepts[o] for o, c in zip(self.owner, self.captions) if c is None}
        own = [c for c in self.captions if c is not None]
        return list(
            dict.fromkeys(own + [t.format(c) for c, ts in zip(self.concepts, self.templates) if c in named for t in ts])
        )

    def prompt(self, i: int, gen: Any) -> str:
        import torch

        templates = self.templates[self.owner[i]]  # the image's concept's
        template = templates[int(torch.randint(len(templates), (), generator=gen))]
        caption = self.captions[i]
        return caption if caption is not None else template.format(self.concepts[self.owner[i]])

    def __call__(self, idx: list[int], gen: Any) -> tuple[Any, Any, list[str]]:
        import torch

        t = torch.randint(0, self.timesteps, (len(idx),), generator=gen)
        noise = torch.randn((len(idx), *self.latent_shape), generator=gen)
        return t, noise, [self.prompt(i, gen) for i in idx]
