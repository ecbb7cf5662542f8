"""The FLUX.1 family of the toy model (``python -m erasekit.toyworld.train --family flux``): its parts, the
conditioning and the loss of a training batch, and the pipeline folder it is saved as.

Built like FLUX.1-schnell, small (docs/toyworld-flux.md has the sizes and the reasons): ``text_encoder`` is a
``CLIPTextModel`` of the SD toy's shape, whose pooled output (the end-of-text token after the final layer norm, no
projection) is the transformer's pooled vector; ``text_encoder_2`` a ``T5EncoderModel`` of T5 v1.1's kind (gated-GELU
FFN, no biases, relative attention) on the counted T5 tokenizer (:mod:`.t5_tokenizer`), whose last hidden state is
the transformer's text tokens; the transformer a ``FluxTransformer2DModel`` over the shipped toy VAE's 4x8x8 latents
packed 2x2 into 16 tokens of 16 channels, without a guidance embedding. The prompts' T5 tokens are padded to
``max_sequence_length`` (16), which the sampler must be given (``pipe(..., max_sequence_length=16)``): FluxPipeline's
default, 512, pads them to a length the model never saw. Exactly what diffusers' ``FluxPipeline.encode_prompt``
builds at that length.

Trained with the flow-matching objective erasekit erases FLUX.1 with (``erasing.denoising.FlowMatching``): latents
``(1 - sigma) * x0 + sigma * noise`` at a uniformly drawn index of the scheduler's 1000 sigmas (shift 1), target
``noise - x0``. No guidance distillation: the model is sampled with real classifier-free guidance
(``true_cfg_scale`` and ``negative_prompt=""``), its unconditional branch the empty prompt's conditioning, as
trained on the 10% empty captions (``captions.py``).

So that T5's tokens carry the prompt, as FLUX.1's transformer reads it (its text tokens in the joint attention of
every block; CLIP's pooled vector only in the modulation), 30% of the rows have their pooled vector replaced by the
empty prompt's, the T5 tokens kept; no row the reverse (docs/toyworld-flux.md says why: a first model trained the
other way round drew from the pooled vector, and T5 alone could not erase from it).

Its loss is erasekit's own ``FlowMatching`` objective, so that training and erasing share one definition; ``train.py``,
above it, drives the training loop.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .train_sdxl import computes_in_float32, drop_paths


@dataclass
class FluxSettings:
    t5_width: int = 64  # d_model: the transformer's joint_attention_dim
    t5_ff: int = 160  # d_ff of the gated-GELU FFN (wi_0, wi_1, wo)
    t5_layers: int = 3
    t5_heads: int = 4
    t5_kv: int = 16  # per head: heads x kv = the width, as in T5 v1.1
    max_sequence_length: int = 16  # T5 tokens per prompt: the longest training caption has 14
    heads: int = 4
    head_dim: int = 32  # = sum of rope_axes
    rope_axes: tuple[int, int, int] = (8, 12, 12)  # FLUX.1: (16, 56, 56) of 128
    double_layers: int = 2
    single_layers: int = 4
    shift: float = 1.0  # the scheduler's static shift (FLUX.1-schnell's): 16 image tokens need none
    p_tokens_empty: float = 0.0  # a row conditioned on its pooled vector alone
    p_pooled_empty: float = 0.3  # a row conditioned on its T5 tokens alone


def make_t5(x: FluxSettings, vocab_size: int) -> Any:
    """A T5 v1.1 encoder (gated GELU, no biases, relative attention) for a vocabulary of ``vocab_size``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=x.t5_width,
        d_ff=x.t5_ff,
        d_kv=x.t5_kv,
        num_heads=x.t5_heads,
        num_layers=x.t5_layers,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def make_transformer(x: FluxSettings, clip_width: int) -> Any:
    """A FluxTransformer2DModel for the toy VAE's 4-channel latents packed 2x2 (16 channels a token), reading T5's
    tokens and CLIP's pooled vector of ``clip_width``, without a guidance embedding (FLUX.1-schnell's kind)."""
    from diffusers import FluxTransformer2DModel

    if sum(x.rope_axes) != x.head_dim:
        raise ValueError(f"rope axes {x.rope_axes} must add up to the head dim {x.head_dim}")
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=x.double_layers,
        num_single_layers=x.single_layers,
        attention_head_dim=x.head_dim,
        num_attention_heads=x.heads,
        joint_attention_dim=x.t5_width,
        pooled_projection_dim=clip_width,
        guidance_embeds=False,
        axes_dims_rope=x.rope_axes,
    )


def make_flux_scheduler(x: FluxSettings) -> Any:
    """FLUX.1-schnell's scheduler config (static shift, no resolution-dependent shifting), at ``x.shift``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=x.shift, use_dynamic_shifting=False)


def flux_vae_config(vae_dir: Path) -> dict[str, Any]:
    """The toy VAE's config as FluxPipeline reads it: ``shift_factor`` 0.0 where it has none (FluxPipeline adds it
    to every latent it decodes; the toy latents are not shifted)."""
    config = json.loads((vae_dir / "config.json").read_text())
    if config.get("shift_factor") is None:
        config["shift_factor"] = 0.0
    return config


class FluxToy:
    """The trained parts (transformer, CLIP, T5), the conditioning and the loss of a training batch. ``clip_ids``:
    prompts -> CLIP token ids [n, 77]; ``t5_ids``: prompts -> T5 token ids [n, ``max_sequence_length``]."""

    def __init__(
        self,
        clip: Any,
        clip_ids: Callable[[list[str]], torch.Tensor],
        t5_ids: Callable[[list[str]], torch.Tensor],
        vocab_size: int,
        x: FluxSettings,
        seed: int,
        device: str,
    ) -> None:
        from ..erasing.denoising import FlowMatching

        self.x = x
        self.te = clip.to(device).train()
        self.t5 = make_t5(x, vocab_size).to(device).train()
        self.transformer = make_transformer(x, clip.config.hidden_size).to(device).train()
        self.clip_ids, self.t5_ids = clip_ids, t5_ids
        self.paths_gen = torch.Generator().manual_seed(seed)  # which rows lose a path
        self.flow = FlowMatching(self.transformer, make_flux_scheduler(x).config, None, None)

    def modules(self) -> dict[str, Any]:
        return {"transformer": self.transformer, "text encoder (CLIP)": self.te, "text encoder 2 (T5)": self.t5}

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules().values() for p in m.parameters()]

    def describe(self) -> str:
        count = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in self.modules().items()}
        return ", ".join(f"{name} {n:.2f}M params" for name, n in count.items())

    def condition(self, texts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The transformer's inputs for ``texts``: T5's last hidden state [n, max_sequence_length, t5 width] and
        ``text_embeds``, CLIP's pooled output [n, clip width]; some rows with one path made the empty prompt's."""
        texts = [*texts, ""]
        tokens, pooled = encode(self.te, self.t5, self.clip_ids(texts), self.t5_ids(texts))
        tokens, pooled = drop_paths(tokens, pooled, self.x.p_tokens_empty, self.x.p_pooled_empty, self.paths_gen)
        return tokens, {"text_embeds": pooled}

    def loss(self, z0: torch.Tensor, noise: torch.Tensor, ts: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Flow matching: MSE between the transformer's velocity for ``z0`` noised at sigma index ``ts`` and
        ``noise - z0``, as erasekit's erase computes it (uniform over the indices, no weighting)."""
        noisy, target = self.flow.noised(z0, noise, ts)
        return F.mse_loss(self.flow.run(noisy, ts, self.condition(texts)), target.float())

    def save(self, vae: Any, tokenizer_dir: Path, scheduler: Any, out: Path, vae_dir: Path | None = None) -> None:
        """``scheduler`` (the SD families') is not FLUX's: the folder gets :func:`make_flux_scheduler`."""
        save_pipeline_flux(vae, self.te, self.t5, self.transformer, tokenizer_dir, self.x, out, vae_dir)


def encode(clip: Any, t5: Any, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.1's conditioning from token ids: T5's last hidden state, and CLIP's pooled output."""
    return t5(t5_ids)[0], clip(clip_ids).pooler_output


def save_pipeline_flux(
    vae: Any,
    clip: Any,
    t5: Any,
    transformer: Any,
    tokenizer_dir: Path,
    x: FluxSettings,
    out: Path,
    vae_dir: Path | None = None,
) -> None:
    """Write a diffusers FluxPipeline folder: both text encoders' weights in float16 (their configs say float32, so
    they load and run in float32), the CLIP tokenizer's slow files as ``tokenizer``, the counted T5 tokenizer as
    ``tokenizer_2`` (its ``model_max_length`` the training's ``max_sequence_length``), and ``vae_dir``'s weights copied
    as they are where given, with ``shift_factor`` 0.0 (:func:`flux_vae_config`). A README.md and erasekit.json
    already in ``out`` are kept."""
    from diffusers import FluxPipeline
    from transformers import CLIPTokenizer

    from .t5_tokenizer import t5_tokenizer

    t5_tok = t5_tokenizer()
    t5_tok.model_max_length = x.max_sequence_length
    if vae.config.shift_factor is None:
        vae.register_to_config(shift_factor=0.0)
    pipe = FluxPipeline(
        scheduler=make_flux_scheduler(x),
        vae=vae,
        text_encoder=copy.deepcopy(clip).to(torch.float16),
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True),
        text_encoder_2=copy.deepcopy(t5).to(torch.float16),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp))  # type: ignore[attr-defined]  # a DiffusionPipeline method diffusers' types hide
    for encoder in ("text_encoder", "text_encoder_2"):
        computes_in_float32(tmp / encoder / "config.json")
    shutil.rmtree(tmp / "tokenizer")  # the slow-tokenizer files (vocab.json, merges.txt, CLIP licence)
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    if vae_dir is not None:  # the shipped VAE's weights byte for byte, its config with a shift_factor
        for weights in vae_dir.glob("*.safetensors"):
            shutil.copy2(weights, tmp / "vae" / weights.name)
        (tmp / "vae" / "config.json").write_text(json.dumps(flux_vae_config(vae_dir), indent=2, sort_keys=True) + "\n")
    for kept in (out / "README.md", out / "erasekit.json"):
        if kept.exists():
            shutil.copy2(kept, tmp / kept.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
