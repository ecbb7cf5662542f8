"""Stable Diffusion 2.x: one OpenCLIP ViT-H/14 text encoder (``gelu``, where SD1.x's CLIP has ``quick_gelu``); the
UNet reads its output. 512 px epsilon and 768 px v-prediction models share every shape: each has its bundled
configs and ModelSpec id."""

from __future__ import annotations

from .base import Conditioning, Family, SingleFile, Slot
from .encoders.clip import OPENCLIP_H

FAMILY = Family(
    name="sd2",
    title="SD2.x",
    line="SD2.x",
    slots=(Slot("te", OPENCLIP_H),),
    single_files=(
        SingleFile("single-file-sd2", {"te": ("oc", "cond_stage_model.model.")}),
        SingleFile("single-file-sd2-embedder", {"te": ("oc", "conditioner.embedders.0.model.")}),
    ),
    modelspec="stable-diffusion-v2",
    modelspec_variants={"epsilon": "-512", "v_prediction": "-768-v"},
    ss_base_model_version="sd_v2",
    ss_v2=True,
    told_apart=("text_encoder", "hidden_act", "gelu"),
    pipeline="StableDiffusionPipeline",
    safety_checker=True,
    bundled=("sd2-512", "sd2-768-v"),
    conditioning=Conditioning(hidden_from=("te",)),
)
