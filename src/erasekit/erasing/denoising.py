"""The denoising loss the erase loop differentiates: the frozen UNet's prediction for noised training latents
under a conditioning, against its target (the noise, or the velocity for v-prediction models), and the random
draws (timesteps, noise, prompts) each step takes, all from one seeded generator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ErasekitError


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
        noisy = self.scheduler.add_noise(x0, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, noise, t)
        return Prediction(self, noisy, t, target, self.run(noisy, t, conditioning))

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
