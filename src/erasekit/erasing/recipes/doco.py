"""DoCo, concept domain correction (Wu et al., arXiv 2405.15304), adapted to the text encoders' FFN layers.

The reference tunes the UNet's cross-attention; here the UNet stays frozen and the patch format does not change:

* each step, on the batch's noised latents, the frozen model's prediction of the clean latents under the
  *anchor* prompt (the step's prompt with the concept's stand-in in its place, ``--stand-in``; the concept's word
  dropped where it has none) is a sample of the anchor's domain, made by the model itself: no anchor images are
  needed;
* a small discriminator learns to tell those from the edited model's clean-latent predictions under the
  *target* prompt; the text encoders' FFN is trained so that the discriminator takes the target's predictions
  for the anchor's (the generator's loss, in place of the published recipe's plain ascent);
* a preservation term holds the text encoders' outputs for the anchor and ``--keep`` prompts where the frozen
  model had them (:mod:`.holding`): every output the UNet reads (the hidden states; SDXL's pooled embedding too),
  so the UNet's conditioning for those prompts, and with it the UNet's output, stays as it was; it stands in for
  the reference's preservation loss on the UNet's output, at the cost of text-encoder passes only;
* concept-preserving gradient surgery (:mod:`erasekit.erasing.surgery`, ``--surgery``, on by default here) removes from
  the adversarial gradient what conflicts with the preservation gradient, per tensor.

The discriminator trains alone for ``disc_warmup`` steps before the text encoders move.
"""

from __future__ import annotations

from typing import Any

from ...format.erase_config import EraseConfig
from . import Objective, Step
from .holding import Holding, names, replace_words


def discriminator(channels: int, size: int, width: int = 64) -> Any:
    """A patch discriminator for latents of ``channels`` x ``size`` x ``size``: strided convolutions down to at most
    4 x 4, then one logit per patch (no normalisation layers: batches are small)."""
    from torch import nn

    layers: list[Any] = [nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2)]
    c = width
    while size > 4:
        layers += [nn.Conv2d(c, min(2 * c, 256), 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c, size = min(2 * c, 256), size // 2
    layers.append(nn.Conv2d(c, 1, 3, padding=1))
    return nn.Sequential(*layers)


class DoCo:
    def __init__(self, config: EraseConfig, concepts: list[str], device: Any) -> None:
        self.config, self.concepts, self.device = config, concepts, device
        self.holding = Holding(config, concepts, device)
        self.stand_ins = {k.lower(): v for k, v in config.stand_ins.items()}
        self.steps = 0
        self.disc: Any = None
        self.pair: tuple[Any, Any] | None = (
            None  # (anchor's, target's) clean latents of the step, for the discriminator
        )

    def anchors(self, prompt: str) -> list[str]:
        """``prompt`` with each erased concept it names replaced by each of its stand-ins ("" where it has none)."""
        alts = [prompt]
        for c in self.concepts:
            if names(prompt, c):
                alts = [replace_words(a, c, s) for a in alts for s in self.stand_ins.get(c.lower(), [""])]
        return alts

    def prepare(self, encode: Any, prompts: list[str]) -> None:
        """The original conditioning of every prompt's anchor (the mean over its stand-ins)."""
        import torch

        self.holding.prepare(encode)
        alts = {p: self.anchors(p) for p in dict.fromkeys(prompts)}
        flat = [a for group in alts.values() for a in group]
        with torch.no_grad():
            cond, added = encode(flat)
        sizes = [len(g) for g in alts.values()]
        conds = [c.mean(0) for c in cond.split(sizes)]
        extra: list[Any] = [None] * len(sizes)  # SDXL's added conditioning (pooled text, size ids), meaned the same way
        if added:
            parts = {k: v.split(sizes) for k, v in added.items()}
            extra = [{k: parts[k][i].mean(0) for k in added} for i in range(len(sizes))]
        self.anchor = {p: (c, a) for p, c, a in zip(alts, conds, extra)}

    def step_prompts(self, gen: Any) -> list[str]:
        return self.holding.step_prompts(gen)

    def objective(self, step: Step) -> Objective:
        import torch
        import torch.nn.functional as F

        pred = step.prediction
        rows = [self.anchor[p] for p in step.prompts]
        cond = torch.stack([c for c, _ in rows])
        added = {k: torch.stack([a[k] for _, a in rows]) for k in rows[0][1]} if rows[0][1] is not None else None
        real = pred.frozen((cond, added)).clean()
        fake = pred.clean()
        if self.disc is None:
            self._make_discriminator(real.shape[1], real.shape[-1])
        self.pair = (real, fake.detach())
        self.steps += 1
        hold = self.holding.penalty(step.conditioning)
        if self.steps <= self.config.disc_warmup:
            return Objective(None, hold)
        logits = self.disc(fake)
        return Objective(F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)), hold)

    def after_step(self, step: Step) -> None:
        """One step of the discriminator: the anchor's predictions are "real", the target's "fake"."""
        import torch
        import torch.nn.functional as F

        real, fake = self.pair  # type: ignore[misc]
        self.disc_opt.zero_grad(set_to_none=True)  # also drops what the generator's loss left in it
        lr, lf = self.disc(real), self.disc(fake)
        loss = F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr)) + F.binary_cross_entropy_with_logits(
            lf, torch.zeros_like(lf)
        )
        loss.backward()
        self.disc_opt.step()
        self.pair = None

    def should_stop(self, losses: list[float]) -> bool:
        return False

    def _make_discriminator(self, channels: int, size: int) -> None:
        """Initialised from the erase's seed, without touching torch's global generator."""
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.disc = discriminator(channels, size).to(self.device)
        self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=self.config.disc_lr, betas=(0.5, 0.999))
