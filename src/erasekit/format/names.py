"""What a patch names: the architectures, their text-encoder slots, and the network module name of each FFN
projection (kohya/LyCORIS style, which ComfyUI and A1111 read), with the ModelSpec and kohya metadata values of
each architecture."""

from __future__ import annotations

import re

ARCH_SLOTS = {"sd1": {"te"}, "sd2": {"te"}, "sdxl": {"te1", "te2"}, "sdxl-refiner": {"te2"}, "clip-text": {"te"}}
SLOTS = ("te", "te1", "te2")
KOHYA_PREFIX = {"te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}
SS_BASE_MODEL_VERSION = {
    "sd1": "sd_v1",
    "sd2": "sd_v2",
    "sdxl": "sdxl_base_v1-0",
    "sdxl-refiner": "sdxl_refiner_v1-0",
    "clip-text": "unknown",
}
MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sdxl-refiner": "stable-diffusion-xl-v1-refiner",
    "clip-text": "clip-text-encoder",
}
_MODULE_RE = re.compile(r"^lora_(te|te1|te2)_text_model_encoder_layers_(0|[1-9]\d*)_mlp_(fc1|fc2)$")


def module_name(slot: str, layer: int, proj: str) -> str:
    """The kohya/LyCORIS network module name of one FFN projection."""
    return f"{KOHYA_PREFIX[slot]}text_model_encoder_layers_{layer}_mlp_{proj}"


def parse_module_name(name: str) -> tuple[str, int, str] | None:
    """``lora_te1_text_model_encoder_layers_3_mlp_fc2`` -> ``("te1", 3, "fc2")``; None if not an FFN module."""
    m = _MODULE_RE.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None
