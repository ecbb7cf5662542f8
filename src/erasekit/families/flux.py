"""FLUX.1 (dev, schnell and their fine-tunes): CLIP ViT-L/14 (te1) and T5 v1.1 XXL (te3, the pipeline's
``text_encoder_2``). The transformer reads T5's last hidden state as its tokens and only CLIP-L's pooled output (before
any projection), so every CLIP-L layer reaches it through that one vector. The T5 slot is ``te3`` as ComfyUI and
kohya name it beside CLIP-L, so a FLUX.1 patch's T5 part is named as a standalone T5's and as SD3.x's
(``lora_te3_encoder_block_{i}_...``); SD3.x patches of te1 and te3 fit it slot for slot, the fingerprints decide.

Its files: diffusers folders; ComfyUI's all-in-one checkpoints (encoders under ``text_encoders.``); Black Forest Labs'
own ``flux1-dev.safetensors`` holds the transformer alone (refused, naming the encoder files to patch). erase, generate
and eval run its diffusers folders (a flow-matching transformer: docs/erase.md) and its single files, with erasekit's
bundled configs of dev or schnell (told apart by the transformer's guidance embedding) or a config folder of the same
model."""

from __future__ import annotations

from .base import Conditioning, Family, Sampling, SingleFile, Slot
from .encoders.clip import CLIP_L
from .encoders.t5 import T5_XXL

FAMILY = Family(
    name="flux",
    title="FLUX.1",
    line="FLUX.1",
    slots=(
        Slot("te1", CLIP_L, "text_encoder", "tokenizer"),
        Slot("te3", T5_XXL, "text_encoder_2", "tokenizer_2"),
    ),
    single_files=(
        SingleFile(
            "single-file-flux",
            {
                "te1": ("hf", "text_encoders.clip_l.transformer.text_model."),
                "te3": ("t5", "text_encoders.t5xxl.transformer."),
            },
        ),
    ),
    modelspec="flux-1",
    ss_base_model_version="flux1",
    told_apart=("text_encoder_2", "model_type", "t5"),
    diffusers_classes=("Flux",),
    kin=("sd3",),
    pipeline="FluxPipeline",
    bundled=("flux-dev", "flux-schnell"),
    variants=(
        ("flux-dev", "guidance_in.", "a guidance embedding (guidance_in): FLUX.1-dev"),
        ("flux-schnell", "", "no guidance embedding: FLUX.1-schnell"),
    ),
    parts=(("transformer", "model.diffusion_model."), ("vae", "first_stage_model.")),
    denoiser_alone=(
        ("double_blocks.", "single_blocks."),
        ("transformer_blocks.", "single_transformer_blocks.", "x_embedder."),  # diffusers' naming
    ),
    vae_file="ae.safetensors",
    flow_matching=True,
    streamed_blocks=("transformer_blocks", "single_transformer_blocks"),
    conditioning=Conditioning(hidden_from=("te3",), pooled_from=("te1",), pooled_projected=False),
    uis=("comfyui",),
    # the diffusers FluxPipeline's defaults and its documentation's: schnell is timestep-distilled (4 steps, prompts
    # of at most 256 T5 tokens) and reads no guidance; dev is guidance-distilled (3.5 into its guidance embedding)
    sampling=(
        Sampling(
            4,
            0.0,
            "none",
            max_sequence_length=256,
            title="FLUX.1 schnell",
            when=("transformer", "guidance_embeds", False),
        ),
        Sampling(28, 3.5, "distilled", title="FLUX.1 dev"),
    ),
)
