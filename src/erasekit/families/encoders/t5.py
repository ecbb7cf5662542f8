"""T5 v1.1 encoders (FLUX.1's and SD3.x's T5-XXL), as transformers (``T5EncoderModel``) names them, which is also
how the standalone files ComfyUI users keep (``t5xxl_fp16.safetensors``) name their keys.

Each block's FFN is gated GELU: ``wi_0`` and ``wi_1`` (hidden -> FFN width) and ``wo`` (back), none with a bias.
transformers keeps ``wo`` in float32 when it loads the rest at half precision (``_keep_in_fp32_modules``), as fp16
overflows there; a patch is added to each tensor in its own dtype, so a file's float32 ``wo`` stays float32.
A network module is the transformers path with dots as underscores:
``encoder_block_{i}_layer_1_DenseReluDense_wi_0``, as ComfyUI and kohya spell it. diffusers loads no LoRA into T5
(its kohya converter drops T5 keys), and A1111 runs no T5 text encoder.

Other T5s name their keys alike and are refused, told apart by their headers (:data:`LOOKALIKES`): umT5 (Wan's), whose
every block has its own relative attention bias; mT5 and byT5, by their vocabularies (250,112 and 384 tokens, where
T5 v1.1 has 32,128); and the original T5 (v1.0), whose FFN is ReLU (``wi``, ``wo``), not gated GELU.
"""

from __future__ import annotations

from ..base import Encoder, EncoderKind, Naming, Unpatched

TRANSFORMERS = Naming("t5", "transformers", "encoder.block.{layer}.layer.1.DenseReluDense.{proj}")
_VOCABULARY = r"(^|\.)(shared|encoder\.embed_tokens)\.weight$"  # the token embedding: [vocabulary, width]

LOOKALIKES = (
    Unpatched(
        "a umT5 text encoder, as Wan uses",
        "relative attention bias in every block",
        keys=(r"(^|\.)block\.[1-9]\d*\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$",),
        classes=("UMT5",),
    ),
    Unpatched(
        "a multilingual mT5 text encoder, as HunyuanDiT uses",
        "a vocabulary of 250112 tokens",
        sizes=((_VOCABULARY, 0, 250112),),
        classes=("MT5",),
    ),
    Unpatched("a byte-level byT5 text encoder", "a vocabulary of 384 tokens", sizes=((_VOCABULARY, 0, 384),)),
    Unpatched(
        "a T5 v1.0 text encoder, whose FFN is ReLU",
        "DenseReluDense.wi, where T5 v1.1 has wi_0 and wi_1",
        keys=(r"(^|\.)DenseReluDense\.wi\.weight$",),
    ),
)

T5 = EncoderKind(
    name="t5",
    title="T5",
    projections=("wi_0", "wi_1", "wo"),
    widening=("wi_0", "wi_1"),
    biases=False,
    namings=(TRANSFORMERS,),
    transformers_classes=("T5EncoderModel",),
    uis=("comfyui",),
    supported="T5 v1.1",
    lookalikes=LOOKALIKES,
    config_dims=("d_model", "d_ff", "num_layers"),
)

T5_XXL = Encoder("T5 v1.1 XXL", T5, (4096, 10240, 24), pad_token="<pad>", file="t5xxl_fp16.safetensors")
