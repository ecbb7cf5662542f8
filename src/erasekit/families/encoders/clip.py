"""CLIP text encoders: OpenAI CLIP ViT-L/14 (SD1.x, SDXL's first, FLUX.1's and SD3.x's), OpenCLIP ViT-H/14 (SD2.x)
and ViT-bigG/14 (SDXL's second, SD3.x's CLIP-G), as transformers (``CLIPTextModel``) and OpenCLIP (``resblocks``, in
single files) name them.

Each layer's FFN is ``fc1`` (hidden -> FFN width) and ``fc2`` (back), both with a bias; OpenCLIP calls them ``c_fc``
and ``c_proj``. A network module is the transformers path with dots as underscores:
``text_model_encoder_layers_{i}_mlp_fc1``.
"""

from __future__ import annotations

from ..base import Encoder, EncoderKind, Naming

TRANSFORMERS = Naming("hf", "transformers", "encoder.layers.{layer}.mlp.{proj}", root="text_model.")
OPENCLIP = Naming(
    "oc", "openclip", "transformer.resblocks.{layer}.mlp.{proj}", renamed={"fc1": "c_fc", "fc2": "c_proj"}
)

CLIP = EncoderKind(
    name="clip",
    title="CLIP",
    projections=("fc1", "fc2"),
    widening=("fc1",),
    biases=True,
    namings=(TRANSFORMERS, OPENCLIP),
    transformers_classes=("CLIPTextModel", "CLIPTextModelWithProjection"),
    uis=("comfyui", "a1111", "diffusers"),
    config_dims=("hidden_size", "intermediate_size", "num_hidden_layers"),
)

# OpenAI's tokenizer pads with its end token; OpenCLIP's with "!" (id 0)
CLIP_L = Encoder("CLIP ViT-L/14", CLIP, (768, 3072, 12), pad_token="<|endoftext|>", file="clip_l.safetensors")
OPENCLIP_H = Encoder("OpenCLIP ViT-H/14", CLIP, (1024, 4096, 24), pad_token="!")  # 24 blocks in single files
OPENCLIP_BIGG = Encoder("OpenCLIP ViT-bigG/14", CLIP, (1280, 5120, 32), pad_token="!", file="clip_g.safetensors")
ANY_CLIP = Encoder("a CLIP text encoder", CLIP, OPENCLIP_BIGG.largest)  # any of them: the largest bounds it
