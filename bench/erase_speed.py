"""erasekit's erase loop against the published recipe's loop: same model, latents, prompts and seed.

    python bench/erase_speed.py --size tiny            # the tiny test pipeline (seconds)
    python bench/erase_speed.py --size sd1 --steps 4   # randomly initialised SD1.x-size UNet + CLIP-L, 32x32 latents
    python bench/erase_speed.py --size sd1 --resolution 512 --device cuda   # on a GPU: the paper's setting

The baseline is the authors' training script as published, reduced to its loop: fp32 throughout, the
whole text encoder in the optimizer (every text-encoder parameter gets a gradient and an Adam update,
as its script had it), and the full text encoder saved at the end of every epoch. Both loops use the
same attention implementation, the same latents (the VAE runs before the timer in both), the same
timesteps, noise and prompts. For erasekit's runs the UNet and VAE are held in the dtype ``erasekit erase`` loads
them in (bf16 where the device computes it natively, with ``--dtypes auto``), for the reference in fp32. Each loop is timed over the optimizer steps only, best of --repeats runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from erasekit._torch import compute_dtype
from erasekit.checkpoints.pipeline import load_pipeline, quiet_libraries
from erasekit.erasing.unlearn import erase
from erasekit.format.erase_config import OBJECT_TEMPLATES, EraseConfig


def sd1_size_pipeline(resolution: int) -> SimpleNamespace:
    """SD1.x's UNet and CLIP-L text encoder at full size, random weights; a 1-block VAE (factor 1) so that
    ``resolution``-pixel images give ``resolution``-sized latents."""
    quiet_libraries()
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.testing import byte_level_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the defaults are SD1.x's UNet
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    tok = byte_level_tokenizer(Path(tempfile.mkdtemp()))
    vae = AutoencoderKL(latent_channels=4)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return SimpleNamespace(unet=unet, text_encoder=te, tokenizer=tok, vae=vae, scheduler=sched)


def images(n: int, resolution: int) -> list:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [
        Image.fromarray((torch.rand(resolution, resolution, 3, generator=g) * 255).byte().numpy()) for _ in range(n)
    ]


def reference_loop(
    pipe: SimpleNamespace, latents: torch.Tensor, concept: str, steps: int, batch: int, seed: int, save_dir: Path
) -> float:
    """The published recipe's loop (see module docstring). Returns seconds over the optimizer steps."""
    te, unet = pipe.text_encoder, pipe.unet
    unet.requires_grad_(False)
    te.requires_grad_(True)
    te.train()
    opt = torch.optim.Adam(te.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-8)
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(seed)
    n = latents.shape[0]
    per_epoch = -(-n // batch)
    device = latents.device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randperm(n, generator=g)[:batch]
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=g).to(device)
        noise = torch.randn((len(idx), *latents.shape[1:]), generator=g).to(device)
        prompts = [
            OBJECT_TEMPLATES[int(torch.randint(len(OBJECT_TEMPLATES), (), generator=g))].format(concept) for _ in idx
        ]
        ids = pipe.tokenizer(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        cond = te(ids.to(device))[0]
        pred = unet(sched.add_noise(latents[idx], noise, t), t, cond).sample
        loss = -F.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % per_epoch == 0:
            te.save_pretrained(save_dir)  # the reference saves the text encoder every epoch
    synchronize()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "sd1"], default="tiny")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--resolution", type=int, default=None, help="image size (default: 32)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtypes", default="auto,bf16", help="erasekit autocast settings to time (comma-separated)")
    args = ap.parse_args()
    res = args.resolution or 32
    device = torch.device(args.device)
    if args.size == "tiny":
        from erasekit.testing import make_tiny_pipeline

        folder = Path(tempfile.mkdtemp()) / "tiny"
        pipe, _ = load_pipeline(make_tiny_pipeline(folder), device=device)
    else:
        pipe = sd1_size_pipeline(res)
        for name in ("unet", "text_encoder", "vae"):
            getattr(pipe, name).to(device)
    imgs = images(4, res)
    cfg = EraseConfig(resolution=res, steps=args.steps, seed=0, device=args.device, cache=False)
    originals = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}

    dtypes = args.dtypes.split(",")
    ours: dict[str, list[float]] = {d: [] for d in dtypes}
    base: list[float] = []
    for _ in range(args.repeats):
        for d in dtypes:  # erase() restores the text encoder when done
            for name in ("unet", "vae"):  # as erase_model loads them: in the dtype the loop computes in
                getattr(pipe, name).to(compute_dtype(d, device))
            ours[d].append(erase(pipe, ["snoopy"], [imgs], cfg.model_copy(update={"dtype": d})).loop_seconds)
        for name in ("unet", "vae"):  # the reference runs fp32 throughout
            getattr(pipe, name).to(torch.float32)
        # the baseline gets the same latents erasekit encoded (VAE outside both timers)
        from erasekit.erasing.training_images import encode_images

        with torch.no_grad():
            loaded = [(im, im.tobytes()) for im in imgs]
            mean, std = encode_images(pipe, loaded, cfg.model_copy(update={"cache": False}), [False] * len(imgs))
            latents = (
                (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0)))
                * pipe.vae.config.scaling_factor
            ).to(device)
        save_dir = Path(tempfile.mkdtemp())
        try:
            base.append(reference_loop(pipe, latents, "snoopy", args.steps, cfg.batch_size, 0, save_dir))
        finally:
            shutil.rmtree(save_dir, ignore_errors=True)
            pipe.text_encoder.load_state_dict(originals)
            pipe.text_encoder.requires_grad_(False)
    b = min(base)
    print(
        f"model            {args.size} ({sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f}M UNet, "
        f"{sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e6:.1f}M text encoder)"
    )
    print(f"device           {device}, torch threads {torch.get_num_threads()}")
    print(f"setting          {args.steps} optimizer steps, batch 2, {res}px images, best of {args.repeats}")
    print(f"reference loop   {b:8.2f} s  ({b / args.steps:.3f} s/step)")
    for d in dtypes:
        o = min(ours[d])
        label = f"erasekit --dtype {d}"
        print(f"{label:<17}{o:7.2f} s  ({o / args.steps:.3f} s/step)   speed-up {b / o:5.2f}x")
    print(f"reproduce        python {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
