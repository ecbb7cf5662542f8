"""Train erasekit's built-in toy text-to-image model and its judge from a seed, on CPU.

    python -m erasekit.toyworld.train --out DIR --seed 0 [--device cpu] [--family sd|sdxl|flux]

Stages (each component is saved as soon as it is done, so a crash does not lose earlier work):

1. render pools of the procedural world (``render.py``): a training pool and a held-out set;
2. VAE: diffusers ``AutoencoderKL`` (~1M parameters, 32x32x3 -> 4x8x8 latents), loss
   MSE + 0.5 L1 + 1e-6 KL; ``scaling_factor`` = 1/std of the training latents.
   Saved to ``DIR/model/vae``;
3. judge: a small CNN with shape/colour/pattern heads (``judge.py``) trained on fresh renders with
   blur/noise augmentation plus VAE reconstructions of renders. Saved to ``DIR/judge.safetensors``;
4. ``UNet2DConditionModel`` + ``CLIPTextModel`` (the real 49408-token CLIP BPE vocabulary, width 64),
   trained jointly on VAE latents and captions (``captions.py``): AdamW, warmup then cosine decay,
   gradient clipping, EMA of the weights, min-SNR-5 loss weighting. The EMA weights are saved as a
   normal diffusers ``StableDiffusionPipeline`` folder ``DIR/model`` (DDIM scheduler, no safety
   checker); the text encoder's weights are stored in float16 (config says float32, so it loads
   in float32) to keep the folder under 20 MB; the shipped model's ``erasekit.json`` (erase
   settings, ``"toyworld": true``) is copied in when the folder has none;
5. a short evaluation: the judge on held-out renders and their VAE reconstructions, and generated
   images of a few prompts, judged. The final report goes to stderr and ``DIR/train_report.json``.

The shipped model in ``erasekit/toyworld/model`` and ``judge.safetensors`` were made with
``--seed 0`` and the default settings (see the model card ``model/README.md``). Every random
choice comes from generators seeded from ``--seed``; on another machine, torch version or thread
count the floating-point results differ slightly, so a retrained model matches the shipped one in
quality, not byte for byte.

``--family sdxl`` trains the SDXL-family toy model of the same world instead (``train_sdxl.py``: a second text
encoder of another width, its pooled embedding and the size ids into the UNet's time embedding; saved as a
``StableDiffusionXLPipeline`` folder ``DIR/model``). It reuses the shipped SD toy model's VAE (copied byte for byte,
``scaling_factor`` kept) and the shipped judge, so stages 2 and 3 are skipped (about 15 minutes saved);
``--train-vae`` and ``--train-judge`` run them as for the SD family. The shipped ``model-sdxl`` was made with
``--family sdxl --seed 0`` and the default settings (see its model card).

``--family flux`` trains the FLUX.1-family toy model (``train_flux.py``: CLIP's pooled output and a small T5's
tokens into a ``FluxTransformer2DModel``, trained by flow matching; saved as a ``FluxPipeline`` folder ``DIR/model``),
reusing the shipped VAE and judge as the sdxl family does. Not trained and not shipped yet (docs/toyworld-flux.md).

Order note: the judge is trained right after the VAE (it needs only the VAE) and before the
diffusion model; the stages use independent seeds, so changing the judge does not change the
diffusion model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from . import builtin_judge_path
from . import captions as cap
from . import render as rd
from .judge import HEADS, Judge

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Settings:
    seed: int = 0
    pool: int = 30000  # renders for the VAE and the diffusion model
    heldout: int = 2000
    # VAE
    vae_steps: int = 500
    vae_batch: int = 64
    vae_lr: float = 1e-3
    # judge
    judge_renders: int = 24000
    judge_recons: int = 8000
    judge_epochs: int = 3
    judge_batch: int = 128
    judge_lr: float = 2e-3
    # diffusion model
    steps: int = 2200
    batch: int = 128
    lr: float = 1e-3
    lr_min: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.01
    ema: float = 0.998
    snr_gamma: float = 5.0
    save_every: int = 500
    # text encoder / unet sizes
    hidden: int = 64
    te_layers: int = 2
    te_heads: int = 4
    te_inter: int = 256
    # evaluation at the end
    eval_n: int = 4


# ----------------------------------------------------------------------------------------- models


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=rd.SIZE,
    )


def unet_kwargs(s: Settings) -> dict:
    return dict(
        sample_size=rd.SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=s.hidden,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def make_unet(s: Settings):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_kwargs(s))


def make_text_encoder(s: Settings):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=s.hidden,
        intermediate_size=s.te_inter,
        num_hidden_layers=s.te_layers,
        num_attention_heads=s.te_heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=s.hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(cfg)


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )


# ------------------------------------------------------------------------------------------ data


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [n,32,32,3] -> float [n,3,32,32] in [0,1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def attrs_of(labels: dict[str, np.ndarray], i: int) -> dict[str, str]:
    return {k: rd.ATTRIBUTES[k][int(labels[k][i])] for k in HEADS}


@torch.no_grad()
def encode(vae, x01: torch.Tensor, bs: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(x01), bs):
        d = vae.encode(x01[i : i + bs] * 2 - 1).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruct(vae, x01: torch.Tensor, gen: torch.Generator, bs: int = 512) -> torch.Tensor:
    out = []
    for i in range(0, len(x01), bs):
        d = vae.encode(x01[i : i + bs] * 2 - 1).latent_dist
        z = d.mean + d.std * torch.randn(d.mean.shape, generator=gen)
        out.append(((vae.decode(z).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def cosine_lr(step: int, total: int, lr: float, lr_min: float, warmup: int = 0) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * min(1.0, p)))


# ------------------------------------------------------------------------------------------- VAE


def train_vae(s: Settings, x01: torch.Tensor, device: str):
    torch.manual_seed(s.seed + 1)
    vae = make_vae().to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed + 2)
    t = time.time()
    for step in range(s.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, s.vae_steps, s.vae_lr, s.vae_lr / 10)
        idx = torch.randint(0, len(x01), (s.vae_batch,), generator=gen)
        x = x01[idx].to(device) * 2 - 1
        d = vae.encode(x).latent_dist
        z = d.mean + d.std * torch.randn(d.mean.shape, generator=gen).to(device)
        y = vae.decode(z).sample
        kl = d.kl().mean()
        loss = F.mse_loss(y, x) + 0.5 * F.l1_loss(y, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == s.vae_steps - 1:
            log(f"vae step {step}/{s.vae_steps} loss {loss.item():.4f} kl {kl.item():.1f} ({time.time() - t:.0f}s)")
    return vae.eval()


# ----------------------------------------------------------------------------------------- judge


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur (random sigma per batch quarter), brightness/contrast jitter, gaussian noise."""
    n = len(x)
    out = x.clone()
    q = n // 4
    for j, sigma in enumerate(
        (0.0, float(torch.rand(1, generator=gen)) * 0.9 + 0.3, float(torch.rand(1, generator=gen)) * 0.6 + 0.2, 0.0)
    ):
        if sigma <= 0:
            continue
        r = torch.arange(-2, 3, dtype=torch.float32)
        k = torch.exp(-(r**2) / (2 * sigma**2))
        k = k / k.sum()
        sl = slice(j * q, (j + 1) * q)
        xb = F.pad(out[sl], (2, 2, 2, 2), mode="replicate")
        xb = F.conv2d(xb, k.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
        out[sl] = F.conv2d(xb, k.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)
    c = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.1
    b = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.06
    out = (out - 0.5) * c + 0.5 + b
    out = out + torch.randn(out.shape, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) * 0.05)
    return out.clamp(0, 1)


def train_judge(s: Settings, x: torch.Tensor, y: dict[str, torch.Tensor], device: str) -> Judge:
    torch.manual_seed(s.seed + 3)
    model = Judge().to(device).train()
    steps_per_epoch = len(x) // s.judge_batch
    total = steps_per_epoch * s.judge_epochs
    opt = torch.optim.AdamW(model.parameters(), lr=s.judge_lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(s.seed + 4)
    step, t = 0, time.time()
    for epoch in range(s.judge_epochs):
        perm = torch.randperm(len(x), generator=gen)
        for b in range(steps_per_epoch):
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, total, s.judge_lr, s.judge_lr / 50, warmup=50)
            idx = perm[b * s.judge_batch : (b + 1) * s.judge_batch]
            xb = augment(x[idx], gen).to(device)
            out = model(xb)
            loss = cast(
                torch.Tensor, sum(F.cross_entropy(out[k], y[k][idx].to(device)) for k in HEADS)
            )  # HEADS: not empty
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 200 == 0:
                log(f"judge epoch {epoch} step {step}/{total} loss {loss.item():.4f} ({time.time() - t:.0f}s)")
            step += 1
    return model.eval()


@torch.no_grad()
def judge_accuracy(model: Judge, x: torch.Tensor, y: dict[str, torch.Tensor], device: str) -> dict[str, float]:
    correct = {k: 0 for k in HEADS}
    for i in range(0, len(x), 500):
        out = model(x[i : i + 500].to(device))
        for k in HEADS:
            correct[k] += int((out[k].argmax(-1).cpu() == y[k][i : i + 500]).sum())
    return {k: correct[k] / len(x) for k in HEADS}


# ------------------------------------------------------------------------------ diffusion model


def save_pipeline(vae, text_encoder, unet, tokenizer_dir: Path, out: Path) -> None:
    """Write a diffusers StableDiffusionPipeline folder; text encoder weights in float16."""
    import copy

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    te16 = copy.deepcopy(text_encoder).to(torch.float16)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te16,
        tokenizer=tok,
        unet=unet,
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp))  # type: ignore[attr-defined]  # a DiffusionPipeline method diffusers' types hide
    # the text encoder is computed in float32: only its stored weights are float16
    cfg_path = tmp / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # ship the slow-tokenizer files (vocab.json + merges.txt + CLIP licence), not transformers' tokenizer.json
    shutil.rmtree(tmp / "tokenizer")
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    keep = [p for p in (out / "README.md", out / "erasekit.json") if p.exists()]
    for p in keep:
        shutil.copy2(p, tmp / p.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


class TokenIds:
    """Prompts -> padded token ids [n, 77] on ``device``, each prompt tokenized once."""

    def __init__(self, tokenizer_dir: Path, device: str) -> None:
        from transformers import CLIPTokenizer

        self.tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        self.device = device
        self.cache: dict[str, list[int]] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        for tx in texts:
            if tx not in self.cache:
                self.cache[tx] = self.tok(tx, padding="max_length", max_length=77, truncation=True)["input_ids"]
        return torch.tensor([self.cache[tx] for tx in texts], device=self.device)


class SDToy:
    """The SD family's trained parts: the UNet and one text encoder, whose last hidden state it cross-attends to."""

    def __init__(self, s: Settings, tokenizer_dir: Path, device: str) -> None:
        self.unet = make_unet(s).to(device).train()
        self.te = make_text_encoder(s).to(device).train()
        self.token_ids = TokenIds(tokenizer_dir, device)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.unet.parameters()) + list(self.te.parameters())

    def describe(self) -> str:
        return (
            f"unet {sum(p.numel() for p in self.unet.parameters()) / 1e6:.2f}M params, "
            f"text encoder {sum(p.numel() for p in self.te.parameters()) / 1e6:.2f}M params"
        )

    def condition(self, texts: list[str]) -> tuple[torch.Tensor, None]:
        return self.te(self.token_ids(texts)).last_hidden_state, None

    def save(self, vae, tokenizer_dir: Path, scheduler, out: Path, vae_dir: Path | None = None) -> None:
        save_pipeline(vae, self.te, self.unet, tokenizer_dir, out)


class T5Ids:
    """Prompts -> T5 token ids [n, ``length``] on ``device`` (the counted T5 tokenizer, padded as FluxPipeline pads
    them to its ``max_sequence_length``), each prompt tokenized once."""

    def __init__(self, length: int, device: str) -> None:
        from .t5_tokenizer import t5_tokenizer

        self.tok, self.length, self.device = t5_tokenizer(), length, device
        self.cache: dict[str, list[int]] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        for tx in texts:
            if tx not in self.cache:
                self.cache[tx] = self.tok(tx, padding="max_length", max_length=self.length, truncation=True)[
                    "input_ids"
                ]
        return torch.tensor([self.cache[tx] for tx in texts], device=self.device)


def make_toy(family: str, s: Settings, tokenizer_dir: Path, device: str, family_settings: Any = None):
    """The family's trained parts, initialised from torch's global generator (seeded by the caller);
    ``family_settings``: the sdxl family's ``SDXLSettings``, the flux family's ``FluxSettings``."""
    if family == "sd":
        return SDToy(s, tokenizer_dir, device)
    te1 = make_text_encoder(s)
    if family == "flux":
        from .train_flux import FluxToy

        t5_ids = T5Ids(family_settings.max_sequence_length, device)
        ids = TokenIds(tokenizer_dir, device)
        return FluxToy(te1, ids, t5_ids, len(t5_ids.tok), family_settings, s.seed + 9, device)
    from .train_sdxl import SDXLToy

    return SDXLToy(unet_kwargs(s), te1, TokenIds(tokenizer_dir, device), family_settings, s.seed + 9, device)


class EpsilonLoss:
    """The sd and sdxl families' objective: DDPM noising (scaled_linear betas, 1000 steps) and the min-SNR-weighted
    MSE of the UNet's noise prediction."""

    def __init__(self, toy: Any, snr_gamma: float, device: str) -> None:
        from diffusers import DDPMScheduler

        self.toy, self.snr_gamma = toy, snr_gamma
        self.noise_sched = DDPMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
        )
        alphas = self.noise_sched.alphas_cumprod.to(device)  # type: ignore[attr-defined]  # set in __init__, hidden from mypy
        self.snr_all = alphas / (1 - alphas)

    def __call__(self, z0: torch.Tensor, noise: torch.Tensor, ts: torch.Tensor, texts: list[str]) -> torch.Tensor:
        zt = self.noise_sched.add_noise(z0, noise, ts)  # type: ignore[attr-defined]  # a method diffusers' types hide
        cond, added = self.toy.condition(texts)
        pred = self.toy.unet(zt, ts, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        snr = self.snr_all[ts]
        w = torch.clamp(snr, max=self.snr_gamma) / snr
        return (F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)) * w).mean()


def train_diffusion(
    s: Settings,
    lat_mean: torch.Tensor,
    lat_std: torch.Tensor,
    labels: dict[str, np.ndarray],
    scaling: float,
    tokenizer_dir: Path,
    vae,
    model_dir: Path,
    device: str,
    family: str = "sd",
    vae_dir: Path | None = None,
    family_settings: Any = None,
):
    """Train the denoiser and the text encoder(s) of ``family`` (``sd``; ``sdxl`` or ``flux``, with its
    ``family_settings``) and save the EMA weights as a pipeline in ``model_dir``; ``vae_dir``: a VAE folder the sdxl
    and flux families copy in as it is. The flux family's objective is flow matching (``FluxToy.loss``), the others'
    :class:`EpsilonLoss`; both draw the same random numbers a step."""
    torch.manual_seed(s.seed + 5)
    toy = make_toy(family, s, tokenizer_dir, device, family_settings)
    objective = toy.loss if family == "flux" else EpsilonLoss(toy, s.snr_gamma, device)
    params = toy.parameters()
    log(toy.describe())
    opt = torch.optim.AdamW(params, lr=s.lr, betas=(0.9, 0.999), weight_decay=s.weight_decay)
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(s.seed + 6)
    rng = random.Random(s.seed + 7)

    def save_ema(tag: str) -> None:
        live = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
        toy.save(vae, tokenizer_dir, make_scheduler(), model_dir, vae_dir)
        with torch.no_grad():
            for p, v in zip(params, live):
                p.copy_(v)
        log(f"saved EMA pipeline ({tag}) to {model_dir}")

    n = len(lat_mean)
    t, running = time.time(), []
    for step in range(s.steps):
        lr = cosine_lr(step, s.steps, s.lr, s.lr_min, s.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (s.batch,), generator=gen)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling
        texts = [cap.caption(attrs_of(labels, int(i)), rng) for i in idx]
        noise = torch.randn(z0.shape, generator=gen)
        ts = torch.randint(0, 1000, (s.batch,), generator=gen)
        z0, noise, ts = z0.to(device), noise.to(device), ts.to(device)
        loss = objective(z0, noise, ts, texts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(s.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        running.append(loss.item())
        if step % 100 == 0 or step == s.steps - 1:
            el = time.time() - t
            eta = el / (step + 1) * (s.steps - step - 1)
            log(
                f"diffusion step {step}/{s.steps} loss {np.mean(running[-100:]):.4f} lr {lr:.2e} ({el:.0f}s, eta {eta:.0f}s)"
            )
        if s.save_every and (step + 1) % s.save_every == 0 and step + 1 < s.steps:
            save_ema(f"step {step + 1}")
    save_ema("final")


# ---------------------------------------------------------------------------------------- main


def make_family_settings(family: str, p_tokens_empty: float | None, p_pooled_empty: float | None) -> Any:
    """The sdxl family's ``SDXLSettings`` or the flux family's ``FluxSettings`` (None for sd), with the shares of
    rows that lose one path where given."""
    if family == "sd":
        return None
    if family == "flux":
        from .train_flux import FluxSettings

        x: Any = FluxSettings()
    else:
        from .train_sdxl import SDXLSettings

        x = SDXLSettings()
    if p_tokens_empty is not None:
        x.p_tokens_empty = p_tokens_empty
    if p_pooled_empty is not None:
        x.p_pooled_empty = p_pooled_empty
    return x


def default_tokenizer_dir() -> Path:
    from . import builtin_model_path

    return builtin_model_path() / "tokenizer"


def shipped_vae_dir() -> Path:
    """The shipped SD toy model's VAE, which the sdxl family reuses (same world, same latents)."""
    from . import builtin_model_path

    return builtin_model_path("toy-sd") / "vae"


def shipped_settings(family: str) -> Path:
    """The erasekit.json a newly trained model starts from: the shipped model's of its family (its recommended erase
    and sampling settings)."""
    from . import builtin_model_path

    return builtin_model_path({"sd": "toy-sd", "sdxl": "toy-sdxl", "flux": "toy-flux"}[family]) / "erasekit.json"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m erasekit.toyworld.train", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", required=True, type=Path, help="output folder (gets model/, judge.safetensors, train_report.json)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine one thread is faster and steadier)",
    )
    ap.add_argument(
        "--bpe-vocab",
        type=Path,
        default=None,
        help="CLIP's bpe_simple_vocab_16e6.txt.gz to build the tokenizer from (default: copy the shipped tokenizer)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny settings, to check that every stage runs (minutes)")
    ap.add_argument("--steps", type=int, default=None, help="diffusion training steps (default 2200)")
    ap.add_argument("--vae-steps", type=int, default=None)
    ap.add_argument("--skip-vae", action="store_true", help="reuse DIR/model/vae")
    ap.add_argument("--skip-judge", action="store_true", help="reuse DIR/judge.safetensors")
    ap.add_argument(
        "--family",
        choices=("sd", "sdxl", "flux"),
        default="sd",
        help="sd: a StableDiffusionPipeline (the shipped toy-sd); sdxl: a StableDiffusionXLPipeline (toy-sdxl); "
        "flux: a FluxPipeline (not shipped yet)",
    )
    ap.add_argument(
        "--train-vae", action="store_true", help="sdxl, flux: train a VAE instead of reusing the shipped one"
    )
    ap.add_argument(
        "--train-judge", action="store_true", help="sdxl, flux: train a judge instead of reusing the shipped one"
    )
    ap.add_argument(
        "--p-tokens-empty",
        type=float,
        default=None,
        help="sdxl, flux: share of rows conditioned on the pooled path alone",
    )
    ap.add_argument(
        "--p-pooled-empty",
        type=float,
        default=None,
        help="sdxl, flux: share of rows conditioned on the token states (flux: T5's) alone",
    )
    args = ap.parse_args(argv)

    s = Settings(seed=args.seed)
    if args.smoke:
        s = Settings(
            seed=args.seed,
            pool=3000,
            heldout=300,
            vae_steps=40,
            judge_renders=2000,
            judge_recons=500,
            judge_epochs=1,
            steps=40,
            save_every=20,
            eval_n=1,
        )
    if args.steps is not None:
        s.steps = args.steps
    if args.vae_steps is not None:
        s.vae_steps = args.vae_steps
    torch.set_num_threads(args.threads)
    device = args.device
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    report: dict = {
        "settings": asdict(s),
        "command": " ".join(["python -m erasekit.toyworld.train", *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__,
        "times_s": {},
    }
    family_settings = make_family_settings(args.family, args.p_tokens_empty, args.p_pooled_empty)
    if family_settings is not None:
        report.update({"family": args.family, args.family: asdict(family_settings)})
    random.seed(s.seed)
    np.random.seed(s.seed)
    torch.manual_seed(s.seed)

    # tokenizer
    tokenizer_dir = out / "tokenizer-src"
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    if args.bpe_vocab is not None:
        from .tokenizer import build_tokenizer_files

        build_tokenizer_files(args.bpe_vocab, tokenizer_dir)
    else:
        shutil.copytree(default_tokenizer_dir(), tokenizer_dir)
    from .tokenizer import check_tokenizer

    check_tokenizer(tokenizer_dir)

    # 1. renders
    t = time.time()
    pool_x, pool_y = rd.dataset(s.pool, seed=s.seed * 1000 + 11)
    held_x, held_y = rd.dataset(s.heldout, seed=s.seed * 1000 + 12)
    log(f"rendered {s.pool} + {s.heldout} images")
    x01, h01 = to_unit(pool_x), to_unit(held_x)
    report["times_s"]["render"] = round(time.time() - t, 1)

    # 2. VAE
    t = time.time()
    vae_dir = shipped_vae_dir() if args.family != "sd" and not args.train_vae else None
    if vae_dir is not None:  # the shipped VAE, scaling_factor and all
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
        gen = torch.Generator().manual_seed(s.seed + 8)
        lat_mean, lat_std = encode(vae, x01)
        scaling = vae.config.scaling_factor
    else:
        if args.skip_vae:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(str(model_dir / "vae")).eval()
        else:
            vae = train_vae(s, x01, device).cpu()
        gen = torch.Generator().manual_seed(s.seed + 8)
        lat_mean, lat_std = encode(vae, x01)
        sample = lat_mean + lat_std * torch.randn(lat_mean.shape, generator=gen)
        scaling = float(1.0 / sample.std())
        vae.register_to_config(scaling_factor=round(scaling, 5))
        scaling = vae.config.scaling_factor
        (model_dir / "vae").mkdir(parents=True, exist_ok=True)
        vae.save_pretrained(str(model_dir / "vae"))
    held_rec = reconstruct(vae, h01, gen)
    rec_mse = float(F.mse_loss(held_rec, h01))
    report["vae"] = {"scaling_factor": scaling, "heldout_recon_mse_01": round(rec_mse, 5)}
    report["times_s"]["vae"] = round(time.time() - t, 1)
    log(f"VAE done: scaling_factor {scaling}, held-out reconstruction MSE {rec_mse:.5f} (images in [0,1])")

    # 3. judge
    t = time.time()
    shipped_judge = args.family != "sd" and not args.train_judge
    judge_path = builtin_judge_path() if shipped_judge else out / "judge.safetensors"
    if args.skip_judge or shipped_judge:
        from .judge import load_judge

        jmodel = load_judge(judge_path)
    else:
        jx, jy = rd.dataset(s.judge_renders, seed=s.seed * 1000 + 13)
        jx01 = to_unit(jx)
        nrec = min(s.judge_recons, len(jx01))
        rec = reconstruct(vae, jx01[:nrec], gen)
        xs = torch.cat([jx01, rec])
        ys = {k: torch.from_numpy(np.concatenate([jy[k], jy[k][:nrec]])) for k in HEADS}
        log(f"judge data: {len(jx01)} renders + {nrec} VAE reconstructions")
        jmodel = train_judge(s, xs, ys, device).cpu()
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in jmodel.state_dict().items()},
            str(out / "judge.safetensors"),
            metadata={"format": "pt", "erasekit.toyworld": "judge", "seed": str(s.seed)},
        )
    hy = {k: torch.from_numpy(held_y[k]) for k in HEADS}
    report["judge"] = {
        "heldout_renders": judge_accuracy(jmodel, h01, hy, "cpu"),
        "heldout_vae_reconstructions": judge_accuracy(jmodel, held_rec, hy, "cpu"),
    }
    report["times_s"]["judge"] = round(time.time() - t, 1)
    log(f"judge done: {report['judge']}")

    # 4. UNet + text encoder
    t = time.time()
    train_diffusion(
        s,
        lat_mean,
        lat_std,
        pool_y,
        scaling,
        tokenizer_dir,
        vae,
        model_dir,
        device,
        args.family,
        vae_dir,
        family_settings,
    )
    report["times_s"]["diffusion"] = round(time.time() - t, 1)
    # erasekit's recommended erase settings and the "toyworld" flag: start from the shipped model's
    shipped = shipped_settings(args.family)
    if not (model_dir / "erasekit.json").exists() and shipped.is_file():
        shutil.copy2(shipped, model_dir / "erasekit.json")

    # 5. evaluation
    t = time.time()
    from .measure import evaluate

    report["generation"] = evaluate(
        model_dir, judge_path=judge_path, n=s.eval_n, seed=10_000 + s.seed, prompt_set="quick", log=log
    )["summary"]
    report["times_s"]["eval"] = round(time.time() - t, 1)
    report["times_s"]["total"] = round(time.time() - T0, 1)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log("REPORT " + json.dumps({k: report[k] for k in ("times_s", "vae", "judge", "generation")}))
    return report


if __name__ == "__main__":
    main()
