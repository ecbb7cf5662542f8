"""What a patch names: the architectures, their text-encoder slots, and the network module name of each FFN
projection (kohya/LyCORIS style, which ComfyUI and A1111 read). All read from :mod:`erasekit.families`."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from ..families import FAMILIES
from ..families.encoders import ENCODER_KINDS, KIND_OF_PROJECTION

ARCH_SLOTS = {f.name: {s.name for s in f.slots} for f in FAMILIES.values()}
SLOTS = tuple(sorted({s for slots in ARCH_SLOTS.values() for s in slots}))
KOHYA_PREFIX = {s: f"lora_{s}_" for s in SLOTS}
if TYPE_CHECKING:
    Architecture = str
    SlotName = str
else:  # validated as Literals, listed in the registry's order
    Architecture = Literal[tuple(FAMILIES)]
    SlotName = Literal[SLOTS]


def _module_patterns() -> list[re.Pattern[str]]:
    """Per encoder kind, the module names of its projections in every slot some family gives it."""
    out = []
    for kind in ENCODER_KINDS.values():
        slots = sorted({s.name for f in FAMILIES.values() for s in f.slots if s.encoder.kind is kind})
        if slots:
            out.append(kind.module_pattern(tuple(slots)))
    return out


_MODULE_RES = _module_patterns()


def module_name(slot: str, layer: int, proj: str) -> str:
    """The kohya/LyCORIS network module name of one FFN projection."""
    return f"{KOHYA_PREFIX[slot]}{KIND_OF_PROJECTION[proj].module(layer, proj)}"


def parse_module_name(name: str) -> tuple[str, int, str] | None:
    """``lora_te1_text_model_encoder_layers_3_mlp_fc2`` -> ``("te1", 3, "fc2")``; None if not an FFN module."""
    m = next((m for pattern in _MODULE_RES if (m := pattern.match(name))), None)
    return (m["slot"], int(m["layer"]), m["proj"]) if m else None
