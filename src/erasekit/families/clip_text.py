"""A CLIP text encoder on its own (a transformers ``CLIPTextModel`` folder or file): patched, never run. Its
patches and a pipeline's meet by matching FFN shapes, one encoder to one."""

from __future__ import annotations

from .base import Family, SingleFile, Slot
from .encoders.clip import ANY_CLIP

FAMILY = Family(
    name="clip-text",
    title="CLIP text encoder",
    line=None,
    slots=(Slot("te", ANY_CLIP),),
    single_files=(
        SingleFile("text-encoder-file", {"te": ("hf", "text_model.")}),
        SingleFile("text-encoder-file", {"te": ("hf", "")}),
    ),
    modelspec="clip-text-encoder",
    ss_base_model_version="unknown",
    bare=True,
    folder_layout="transformers-clip",
    parts=(),
)
