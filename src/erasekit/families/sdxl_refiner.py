"""SDXL refiner: OpenCLIP ViT-bigG/14 alone, in the base's te2 slot (the base's te2 patches fit it). Its single
files keep that encoder where SD2.x files of the newer form keep theirs; its UNet's ``label_emb`` tells them apart.
erase and generate do not run it, and both UIs know its encoder by names of their own."""

from __future__ import annotations

from .base import Family, SingleFile, Slot
from .encoders.clip import OPENCLIP_BIGG

FAMILY = Family(
    name="sdxl-refiner",
    title="SDXL refiner",
    line="SDXL",
    slots=(Slot("te2", OPENCLIP_BIGG, "text_encoder_2", "tokenizer_2"),),
    single_files=(
        SingleFile(
            "single-file-sdxl-refiner",
            {"te2": ("oc", "conditioner.embedders.0.model.")},
            marker="model.diffusion_model.label_emb.",
        ),
    ),
    modelspec="stable-diffusion-xl-v1-refiner",
    ss_base_model_version="sdxl_refiner_v1-0",
    kin=("sdxl",),
    why_not_run="the SDXL refiner has no prompt encoder of its own to erase from; erase with the base model",
    bundled=("sdxl-refiner",),
    # ComfyUI maps lora_te_ to the only encoder when no CLIP-L is loaded; A1111 names OpenCLIP's own layers
    ui_modules={"comfyui": ("lora_te_", "hf"), "a1111": ("0_model_", "oc")},
)
