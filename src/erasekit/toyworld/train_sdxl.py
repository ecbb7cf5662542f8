"""The SDXL family of the toy model (``python -m erasekit.toyworld.train --family sdxl``): its parts, the
conditioning of a training batch, and the pipeline folder it is saved as.

Built like SDXL base, small: ``text_encoder`` is a ``CLIPTextModel`` (the SD toy's: width 64, quick_gelu),
``text_encoder_2`` a ``CLIPTextModelWithProjection`` of another width (80, gelu as OpenCLIP bigG uses), both on
the same 49408-token CLIP tokenizer (``tokenizer`` and ``tokenizer_2`` are the same files). The UNet cross-attends
to both encoders' penultimate hidden states concatenated (no final layer norm) and adds te2's pooled, projected
embedding and the six size ids (original 32x32, crop 0,0, target 32x32) to its time embedding
(``addition_embed_type="text_time"``): exactly what diffusers' ``StableDiffusionXLPipeline.encode_prompt`` builds.

So that both paths carry the concepts, 30% of the training rows have their token states replaced by those of the
empty prompt (the pooled embedding kept): the pooled embedding learns to draw the prompt on its own. No row has
only its pooled embedding replaced (``p_pooled_empty`` 0): a model trained to draw from the token states alone
too ignored the pooled embedding whenever the tokens were there (taking it away cost nothing), unlike SDXL. The
captions themselves are empty 10% of the time (``captions.py``), both paths then the empty prompt's. The
pipeline is saved with ``force_zeros_for_empty_prompt=False``: the unconditional branch of classifier-free
guidance encodes "" (as diffusers, ComfyUI and A1111 then all do), as the model was trained.

Needs only the toy world and the libraries (``train.py``, above it, drives the training loop).
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

from .render import SIZE

# original size (h, w), crop top-left (y, x), target size (h, w): what diffusers' SDXL pipeline passes at 32x32
TIME_IDS = (SIZE, SIZE, 0, 0, SIZE, SIZE)


@dataclass
class SDXLSettings:
    te2_hidden: int = 80  # wider than te1 as bigG is than CLIP-L; its token embedding is most of the folder's bytes
    te2_layers: int = 2
    te2_heads: int = 4
    te2_inter: int = 320
    projection_dim: int = 64  # te2's pooled embedding
    time_embed_dim: int = 8  # per size id (addition_time_embed_dim)
    p_tokens_empty: float = 0.3  # a row conditioned on its pooled embedding alone
    p_pooled_empty: float = 0.0  # a row conditioned on its token states alone


def make_text_encoder_2(x: SDXLSettings) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=x.te2_hidden,
        intermediate_size=x.te2_inter,
        num_hidden_layers=x.te2_layers,
        num_attention_heads=x.te2_heads,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=x.projection_dim,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(cfg)


def make_unet_sdxl(unet_kwargs: dict[str, Any], te1_width: int, x: SDXLSettings) -> Any:
    """The SD toy's UNet (``unet_kwargs``), reading both encoders and te2's pooled embedding with the size ids."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        **{
            **unet_kwargs,
            "cross_attention_dim": te1_width + x.te2_hidden,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": x.time_embed_dim,
            "projection_class_embeddings_input_dim": len(TIME_IDS) * x.time_embed_dim + x.projection_dim,
        }
    )


class SDXLToy:
    """The trained parts (UNet, te1, te2) and the conditioning of a training batch. ``token_ids``: prompts ->
    padded ids [n, 77] (one tokenizer serves both encoders: they share its files)."""

    def __init__(
        self,
        unet_kwargs: dict[str, Any],
        text_encoder: Any,
        token_ids: Callable[[list[str]], torch.Tensor],
        x: SDXLSettings,
        seed: int,
        device: str,
    ) -> None:
        self.x = x
        self.unet = make_unet_sdxl(unet_kwargs, text_encoder.config.hidden_size, x).to(device).train()
        self.te1 = text_encoder.to(device).train()
        self.te2 = make_text_encoder_2(x).to(device).train()
        self.token_ids = token_ids
        self.paths_gen = torch.Generator().manual_seed(seed)  # which rows lose a path

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.unet.parameters(), *self.te1.parameters(), *self.te2.parameters()]

    def describe(self) -> str:
        count = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in self.modules().items()}
        return ", ".join(f"{name} {n:.2f}M params" for name, n in count.items())

    def modules(self) -> dict[str, Any]:
        return {"unet": self.unet, "text encoder": self.te1, "text encoder 2": self.te2}

    def condition(self, texts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The UNet's inputs for ``texts``: token states [n, 77, te1 + te2 width] and the added conditioning
        (``text_embeds``: te2's pooled embedding, ``time_ids``), some rows with one path made the empty prompt's."""
        ids = self.token_ids([*texts, ""])
        tokens, pooled = encode(self.te1, self.te2, ids)
        tokens, pooled = self.drop_paths(tokens, pooled)
        return tokens, {"text_embeds": pooled, "time_ids": time_ids(len(texts), tokens)}

    def drop_paths(self, tokens: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[:-1]`` are the batch, the last row the empty prompt's. A row keeps both paths, or has its token
        states (probability ``p_tokens_empty``) or else its pooled embedding (``p_pooled_empty``) replaced by the
        empty prompt's, never both."""
        return drop_paths(tokens, pooled, self.x.p_tokens_empty, self.x.p_pooled_empty, self.paths_gen)

    def save(self, vae: Any, tokenizer_dir: Path, scheduler: Any, out: Path, vae_dir: Path | None = None) -> None:
        save_pipeline_sdxl(vae, self.te1, self.te2, self.unet, tokenizer_dir, scheduler, out, vae_dir)


def drop_paths(
    tokens: torch.Tensor, pooled: torch.Tensor, p_tokens_empty: float, p_pooled_empty: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[:-1]`` of ``tokens`` and ``pooled`` are the batch, the last row the empty prompt's. A row keeps both
    paths, or has its token states (probability ``p_tokens_empty``) or else its pooled embedding (``p_pooled_empty``)
    replaced by the empty prompt's, never both; one uniform draw a row from ``gen``."""
    draw = torch.rand(len(tokens) - 1, generator=gen).to(tokens.device)
    pooled_only = draw < p_tokens_empty
    tokens_only = (draw >= p_tokens_empty) & (draw < p_tokens_empty + p_pooled_empty)
    return (
        torch.where(pooled_only[:, None, None], tokens[-1:], tokens[:-1]),
        torch.where(tokens_only[:, None], pooled[-1:], pooled[:-1]),
    )


def encode(te1: Any, te2: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning from token ids: both encoders' penultimate hidden states concatenated, and te2's pooled
    (projected) embedding."""
    h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
    out2 = te2(ids, output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds


def time_ids(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([TIME_IDS], dtype=like.dtype, device=like.device).repeat(n, 1)


def save_pipeline_sdxl(
    vae: Any,
    te1: Any,
    te2: Any,
    unet: Any,
    tokenizer_dir: Path,
    scheduler: Any,
    out: Path,
    vae_dir: Path | None = None,
) -> None:
    """Write a diffusers StableDiffusionXLPipeline folder (``force_zeros_for_empty_prompt`` False): both text
    encoders' weights in float16 (their configs say float32, so they load and run in float32), the tokenizer's
    slow files as ``tokenizer`` and ``tokenizer_2``, and ``vae_dir`` copied as it is where given (the SD toy's VAE,
    byte for byte). A README.md and erasekit.json already in ``out`` are kept."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=copy.deepcopy(te1).to(torch.float16),
        text_encoder_2=copy.deepcopy(te2).to(torch.float16),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp))  # type: ignore[attr-defined]  # a DiffusionPipeline method diffusers' types hide
    for encoder in ("text_encoder", "text_encoder_2"):
        computes_in_float32(tmp / encoder / "config.json")
    for sub, source in (("tokenizer", tokenizer_dir), ("tokenizer_2", tokenizer_dir), ("vae", vae_dir)):
        if source is not None:  # the slow-tokenizer files (vocab.json, merges.txt, CLIP licence); the VAE as it was
            shutil.rmtree(tmp / sub)
            shutil.copytree(source, tmp / sub)
    for kept in (out / "README.md", out / "erasekit.json"):
        if kept.exists():
            shutil.copy2(kept, tmp / kept.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def computes_in_float32(config_path: Path) -> None:
    """Only an encoder's stored weights are float16: its config says float32, so ``from_pretrained`` computes in
    float32."""
    cfg = json.loads(config_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
