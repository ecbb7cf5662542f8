"""Stable Diffusion 1.x: one OpenAI CLIP ViT-L/14 text encoder; the UNet reads its output."""

from __future__ import annotations

from .base import Conditioning, Family, SingleFile, Slot
from .encoders.clip import CLIP_L

FAMILY = Family(
    name="sd1",
    title="SD1.x",
    line="SD1.x",
    slots=(Slot("te", CLIP_L),),
    single_files=(
        SingleFile("single-file-sd1", {"te": ("hf", "cond_stage_model.transformer.text_model.")}),
        SingleFile("single-file-sd1-old", {"te": ("hf", "cond_stage_model.transformer.")}),  # without text_model.
    ),
    modelspec="stable-diffusion-v1",
    ss_base_model_version="sd_v1",
    pipeline="StableDiffusionPipeline",
    safety_checker=True,
    bundled=("sd1",),
    conditioning=Conditioning(hidden_from=("te",)),
)
