"""The kinds of text encoder erasekit edits, one module each: what one layer's FFN holds and how it is named."""

from __future__ import annotations

from ..base import EncoderKind, Naming
from .clip import CLIP
from .t5 import T5

ENCODER_KINDS: dict[str, EncoderKind] = {k.name: k for k in (CLIP, T5)}
NAMINGS: dict[str, Naming] = {n.name: n for k in ENCODER_KINDS.values() for n in k.namings}
KIND_OF_NAMING: dict[str, EncoderKind] = {n.name: k for k in ENCODER_KINDS.values() for n in k.namings}
KIND_OF_PROJECTION: dict[str, EncoderKind] = {p: k for k in ENCODER_KINDS.values() for p in k.projections}
