"""SD3.x (SD3 medium, SD3.5 medium and large): CLIP ViT-L/14 (te1), OpenCLIP ViT-bigG/14 (te2, in transformers
naming) and T5 v1.1 XXL (te3), which a pipeline and a single file may be without. The transformer reads te1's and te2's
penultimate hidden states joined along the features, zero-padded to T5's width and followed along the sequence by
T5's last hidden state (zeros without T5), and te1's and te2's projected pooled embeddings joined.

Its files: diffusers folders (``text_encoder_3`` may be absent); SD3.5 all-in-one single files (encoders under
``text_encoders.clip_l.``, ``text_encoders.clip_g.``, ``text_encoders.t5xxl.``, with or without T5); a file of the
transformer alone is refused, naming the encoder files to patch. erase, generate and eval run its diffusers folders
(a flow-matching transformer: docs/erase.md) and its single files, with erasekit's bundled configs of SD3 medium,
SD3.5 medium or SD3.5 large (told apart by the transformer's keys) or a config folder of the same model."""

from __future__ import annotations

from .base import Conditioning, Family, Sampling, SingleFile, Slot
from .encoders.clip import CLIP_L, OPENCLIP_BIGG
from .encoders.t5 import T5_XXL

CLIP_L_KEYS = ("hf", "text_encoders.clip_l.transformer.text_model.")
CLIP_G_KEYS = ("hf", "text_encoders.clip_g.transformer.text_model.")

FAMILY = Family(
    name="sd3",
    title="SD3.x",
    line="SD3.x",
    slots=(
        Slot("te1", CLIP_L, "text_encoder", "tokenizer"),
        Slot("te2", OPENCLIP_BIGG, "text_encoder_2", "tokenizer_2"),
        Slot("te3", T5_XXL, "text_encoder_3", "tokenizer_3", optional=True),
    ),
    single_files=(
        SingleFile(
            "single-file-sd3",
            {"te1": CLIP_L_KEYS, "te2": CLIP_G_KEYS, "te3": ("t5", "text_encoders.t5xxl.transformer.")},
        ),
        SingleFile("single-file-sd3", {"te1": CLIP_L_KEYS, "te2": CLIP_G_KEYS}),  # SD3 medium's "incl_clips"
    ),
    modelspec="stable-diffusion-3",
    ss_base_model_version="sd3",
    diffusers_classes=("StableDiffusion3",),
    pipeline="StableDiffusion3Pipeline",
    bundled=("sd3-medium", "sd3.5-medium", "sd3.5-large"),
    variants=(
        ("sd3.5-medium", ".attn2.", "dual-attention blocks (attn2): SD3.5 medium"),
        ("sd3.5-large", ".ln_q.", "QK norms (ln_q) without dual attention: SD3.5 large or large turbo"),
        ("sd3-medium", "", "neither QK norms nor dual attention: SD3 medium"),
    ),
    parts=(("transformer", "model.diffusion_model."), ("vae", "first_stage_model.")),
    denoiser_alone=(("joint_blocks.",), ("transformer_blocks.", "context_embedder.", "pos_embed.")),
    flow_matching=True,
    streamed_blocks=("transformer_blocks",),
    conditioning=Conditioning(
        hidden_from=("te1", "te2"), hidden_layer="penultimate", sequence_from=("te3",), pooled_from=("te1", "te2")
    ),
    uis=("comfyui",),
    # Stability AI's model cards: SD3.5 large (38 transformer blocks) 28 steps at CFG 3.5, SD3.5 medium (MMDiT-X:
    # RMS-normed attention in 24 blocks) 40 at 4.5, SD3 medium 28 at 7.0 (diffusers' defaults). SD3.5 large turbo's
    # configs are large's: its 4 steps without guidance are given as --steps 4 --guidance 0
    sampling=(
        Sampling(28, 3.5, title="SD3.5 large", when=("transformer", "num_layers", 38)),
        Sampling(40, 4.5, title="SD3.5 medium", when=("transformer", "qk_norm", "rms_norm")),
        Sampling(28, 7.0, title="SD3 medium"),
    ),
)
