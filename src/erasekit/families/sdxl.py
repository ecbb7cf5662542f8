"""SDXL base: CLIP ViT-L/14 (te1) and OpenCLIP ViT-bigG/14 (te2). The UNet reads both encoders' penultimate hidden
states side by side, te2's pooled embedding (from its last layer) and the image size ids."""

from __future__ import annotations

from .base import Conditioning, Family, SingleFile, Slot
from .encoders.clip import CLIP_L, OPENCLIP_BIGG

FAMILY = Family(
    name="sdxl",
    title="SDXL base",
    line="SDXL",
    slots=(
        Slot("te1", CLIP_L, "text_encoder", "tokenizer"),
        Slot("te2", OPENCLIP_BIGG, "text_encoder_2", "tokenizer_2"),
    ),
    single_files=(
        SingleFile(
            "single-file-sdxl",
            {
                "te1": ("hf", "conditioner.embedders.0.transformer.text_model."),
                "te2": ("oc", "conditioner.embedders.1.model."),
            },
        ),
    ),
    modelspec="stable-diffusion-xl-v1-base",
    ss_base_model_version="sdxl_base_v1-0",
    pipeline="StableDiffusionXLPipeline",
    bundled=("sdxl",),
    conditioning=Conditioning(
        hidden_from=("te1", "te2"), hidden_layer="penultimate", pooled_from=("te2",), size_ids=True
    ),
)
