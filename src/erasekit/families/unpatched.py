"""Model lines erasekit does not patch yet, as data: how their diffusers folders (by pipeline class), their text
encoders' files (:data:`ENCODERS`: the language models they read prompts with) and a file of their denoiser alone
are recognised, so that each is refused in one line that names it and its text encoders instead of being read as
something else (a FLUX.2 transformer as FLUX.1's, a Qwen2.5-VL file as a file without encoders). Everything is
told from a file's header (its tensors' names and shapes) or a config's class names. Torch-free, no I/O.
"""

from __future__ import annotations

from .base import NotYet, Unpatched, with_article

_DECODER_LAYERS = r"layers\.\d+\.mlp\.gate_proj\.weight$"  # a Llama-style language model's FFN
_VOCABULARY = r"(^|\.)embed_tokens\.weight$"  # its token embedding: [vocabulary, width]

# the language models newer families encode prompts with, the most telling first
ENCODERS = (
    Unpatched(
        "a Gemma language model, as Lumina 2 and Sana use",
        "layer norms before and after each FFN",
        keys=(r"layers\.\d+\.pre_feedforward_layernorm\.weight$",),
        classes=("Gemma",),
        yet=True,
    ),
    Unpatched(
        "a Qwen3 language model, as Z-Image and FLUX.2 [klein] use",
        "query and key norms in its attention",
        keys=(_DECODER_LAYERS, r"layers\.\d+\.self_attn\.q_norm\.weight$"),
        classes=("Qwen3",),
        yet=True,
    ),
    Unpatched(
        "Qwen2.5-VL, Qwen-Image's text encoder",
        "a vision tower beside a language model with attention biases",
        keys=(_DECODER_LAYERS, r"layers\.\d+\.self_attn\.q_proj\.bias$", r"(^|\.)visual\."),
        classes=("Qwen2_5_VL",),
        yet=True,
    ),
    Unpatched(
        "a Qwen2 language model, as Qwen-Image's Qwen2.5-VL is",
        "attention biases",
        keys=(_DECODER_LAYERS, r"layers\.\d+\.self_attn\.q_proj\.bias$"),
        classes=("Qwen2",),
        yet=True,
    ),
    Unpatched(
        "a Mistral language model, as FLUX.2 [dev] uses",
        "a vocabulary of 131072 tokens, Mistral Small 3.1's",
        keys=(_DECODER_LAYERS,),
        sizes=((_VOCABULARY, 0, 131072),),
        classes=("Mistral",),
        yet=True,
    ),
    Unpatched(
        "a Llama 3 language model, as HiDream uses",
        "a vocabulary of 128256 tokens, Llama 3.1's",
        keys=(_DECODER_LAYERS,),
        sizes=((_VOCABULARY, 0, 128256),),
        classes=("Llama",),
        yet=True,
    ),
    Unpatched(
        "a language model, as Qwen-Image, HiDream, Lumina 2 and FLUX.2 encode prompts with",
        "decoder layers with gated FFNs, layers.N.mlp.gate_proj",
        keys=(_DECODER_LAYERS,),
        yet=True,
    ),
)


def _denoiser(
    line: str, part: str, evidence: str, *keys: str, sizes: tuple[tuple[str, int, int], ...] = ()
) -> Unpatched:
    """How a file of ``line``'s denoiser (``part``: "transformer") alone is told: tensors named by ``keys`` (after
    any prefix, ``model.diffusion_model.`` included)."""
    return Unpatched(
        f"{with_article(line)} {part}", evidence, keys=tuple(rf"(^|\.){k}" for k in keys), sizes=sizes, yet=True
    )


# in the order they are tried: a FLUX.2 or Chroma transformer before FLUX.1's (they share its double and single
# blocks), Z-Image's before Lumina's (the same blocks; Z-Image's are 3840 wide)
LINES = (
    NotYet(
        "FLUX.2",
        "Mistral Small 3.1 ([dev]) or Qwen3 ([klein]), no CLIP or T5",
        ("Flux2",),
        _denoiser("FLUX.2", "transformer", "modulation shared by its blocks", r"double_stream_modulation_img\."),
    ),
    NotYet(
        "Chroma",
        "T5 v1.1 XXL alone",
        ("Chroma",),
        _denoiser("Chroma", "transformer", "a distilled guidance layer", r"distilled_guidance_layer\."),
    ),
    NotYet(
        "Qwen-Image",
        "Qwen2.5-VL",
        ("QwenImage",),
        _denoiser(
            "Qwen-Image",
            "transformer",
            "img_mod and txt_norm",
            r"txt_norm\.weight$",
            r"transformer_blocks\.\d+\.img_mod\.",
        ),
    ),
    NotYet(
        "HiDream",
        "Llama 3.1 8B beside T5 v1.1 XXL and two CLIPs",
        ("HiDream",),
        _denoiser(
            "HiDream",
            "transformer",
            "double- and single-stream blocks",
            r"double_stream_blocks\.",
            r"single_stream_blocks\.",
        ),
    ),
    NotYet(
        "Z-Image",
        "Qwen3",
        ("ZImage",),
        _denoiser(
            "Z-Image",
            "transformer",
            "a caption embedder and refiners, 3840 wide",
            r"cap_embedder\.",
            r"noise_refiner\.",
            r"context_refiner\.",
            sizes=((r"(^|\.)cap_embedder\.1\.weight$", 0, 3840),),
        ),
    ),
    NotYet(
        "Lumina",
        "Gemma",
        ("Lumina",),
        _denoiser(
            "Lumina",
            "transformer",
            "a caption embedder and refiners",
            r"cap_embedder\.",
            r"noise_refiner\.",
            r"context_refiner\.",
        ),
    ),
    NotYet(
        "Wan",
        "umT5-XXL",
        ("Wan",),
        _denoiser("Wan", "transformer", "head.modulation", r"head\.modulation$", r"blocks\.\d+\.cross_attn\."),
    ),
    NotYet(
        "HunyuanVideo",
        "LLaVA-Llama 3 8B and CLIP ViT-L/14",
        ("HunyuanVideo",),
        _denoiser(
            "HunyuanVideo",
            "transformer",
            "a token refiner",
            r"(txt_in\.individual_token_refiner|context_embedder\.token_refiner)\.",
        ),
    ),
    NotYet(
        "HunyuanDiT",
        "a bilingual CLIP (BERT) and mT5-XL",
        ("HunyuanDiT",),
        _denoiser("HunyuanDiT", "transformer", "mlp_t5", r"mlp_t5\."),
    ),
    NotYet(
        "AuraFlow",
        "Pile-T5-XL (a umT5)",
        ("AuraFlow",),
        _denoiser("AuraFlow", "transformer", "double_layers", r"double_layers\.\d+\.attn\.w1q\."),
    ),
    NotYet("PixArt", "T5 v1.1 XXL", ("PixArt",)),
    NotYet("Sana", "Gemma 2", ("Sana",)),
    NotYet("Kolors", "ChatGLM3", ("Kolors",)),
)
