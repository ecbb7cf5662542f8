"""A T5 text encoder on its own (a standalone ``t5xxl_fp16.safetensors`` as ComfyUI users keep it, or a transformers
``T5EncoderModel`` folder): patched, never run. Its slot is ``te3``, so its patches' modules are named
``lora_te3_encoder_block_{i}_layer_1_DenseReluDense_wi_0``, the name ComfyUI gives T5 beside FLUX's CLIP-L and
SD3's two CLIPs (and kohya's ``lora_te3``)."""

from __future__ import annotations

from .base import Family, SingleFile, Slot
from .encoders.t5 import T5_XXL

FAMILY = Family(
    name="t5-text",
    title="T5 text encoder",
    line=None,
    slots=(Slot("te3", T5_XXL),),
    single_files=(SingleFile("t5-encoder-file", {"te3": ("t5", "")}),),
    modelspec="t5-text-encoder",
    ss_base_model_version="unknown",
    bare=True,
    folder_layout="transformers-t5",
    parts=(),
)
