"""Patches as ComfyUI and AUTOMATIC1111 load them: which files load as they are, and UI-specific exports.

A patch's tensors are named like a kohya/LyCORIS text-encoder network, which both UIs read. Two cases need a file
made for one UI (``erasekit export PATCH --ui comfyui|a1111``):

- the SDXL refiner: its only encoder is OpenCLIP bigG. ComfyUI maps ``lora_te_...`` (not ``lora_te2_...``) to it
  when no CLIP-L is present; A1111 knows it only by its own layer name ``0_model_transformer_resblocks_{i}_mlp_c_fc``
  (``c_proj`` for fc2). No name serves both.
- low-rank deltas in A1111: its LoRA module type never reads ``.diff_b``, so a bias delta beside
  ``.lora_up/.lora_down`` would be dropped silently. The A1111 export stores such modules as LyCORIS "full"
  modules (``.diff`` = the multiplied-out weight delta, F32, and ``.diff_b``), which A1111 applies exactly; the
  export is as large as a dense patch. ComfyUI reads ``.diff_b`` beside a LoRA, so its file stays low-rank.

Both UIs list only ``.safetensors`` (and pickle suffixes they open with ``torch.load``) in their LoRA folders, so
every file meant for a UI is named ``NAME.safetensors``. Torch-free.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _st
from .errors import ErasekitError, TargetNotWritableError
from .patchfile import Patch, load_patch, manifest_json, metadata_for

UIS = ("comfyui", "a1111")
UI_NAMES = {"comfyui": "ComfyUI", "a1111": "AUTOMATIC1111"}
EXPORT_KEY = "erasekit_export"  # metadata key of an export: {"ui", "patch_id", "manifest"}
_OPENCLIP = {"fc1": "c_fc", "fc2": "c_proj"}


@dataclass
class ExportReport:
    source: str
    output: str
    ui: str
    modules: int
    dense_for_bias: int  # low-rank modules written dense so that A1111 applies their bias deltas
    bytes: int
    notes: list[str] = field(default_factory=list)


def network_name(architecture: str, slot: str, layer: int, proj: str, ui: str) -> str | None:
    """The network module name ``ui`` maps to this FFN projection; None where the patch's own name serves."""
    if architecture != "sdxl-refiner":
        return None
    if ui == "comfyui":
        return f"lora_te_text_model_encoder_layers_{layer}_mlp_{proj}"
    return f"0_model_transformer_resblocks_{layer}_mlp_{_OPENCLIP[proj]}"


def _bias_beside_lowrank(patch: Patch) -> list[str]:
    return [m for m, d in patch.manifest.deltas.items() if d.storage == "lowrank" and d.bias]


def loads_as_is(patch: Patch, ui: str) -> bool:
    """Whether ``ui`` applies every tensor of the patch file as erasekit does, with the file just renamed
    to ``.safetensors``."""
    if patch.manifest.base.architecture == "sdxl-refiner":
        return False
    return ui == "comfyui" or not _bias_beside_lowrank(patch)


def ui_advice(patch: Patch, path: str | os.PathLike) -> list[str]:
    """One line per UI: where to put the file, or the export command that makes one."""
    path = Path(path)
    name = path.with_suffix(".safetensors").name
    lines = []
    for ui in UIS:
        if loads_as_is(patch, ui):
            how = f"use {path.name} as it is" if path.suffix == ".safetensors" else f"copy it as {name}"
        else:
            how = f"erasekit export {path} --ui {ui} -o {path.with_name(f'{path.stem}-{ui}.safetensors')}"
        lines.append(f"{UI_NAMES[ui]}: {how}")
    return lines


def export_tensors(patch: Patch, ui: str) -> tuple[dict[str, tuple[str, tuple[int, ...], bytes]], int]:
    """The exported tensors (name -> dtype, shape, bytes) and how many low-rank modules became dense."""
    arch = patch.manifest.base.architecture
    dense_for_bias = set(_bias_beside_lowrank(patch)) if ui == "a1111" else set()
    out: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for module, slot, layer, proj in patch.modules():
        name = network_name(arch, slot, layer, proj, ui) or module
        if module in dense_for_bias:
            parts = {".diff": (patch.weight_delta(module), "F32"), ".diff_b": (patch.tensors[f"{module}.diff_b"], "F32")}
        else:
            parts = {t[len(module):]: (patch.tensors[t], patch.dtypes[t]) for t in patch.tensors
                     if t.startswith(module + ".")}
        for suffix, (arr, dtype) in parts.items():
            arr = np.asarray(arr, dtype=np.float32)
            out[name + suffix] = (dtype, tuple(arr.shape), _st.encode(arr, dtype))
    return out, len(dense_for_bias)


def export_patch(source: str | os.PathLike, ui: str, output: str | os.PathLike) -> ExportReport:
    """Write the patch at ``source`` as a file ``ui`` loads with every tensor matched and erasekit's weights."""
    if ui not in UIS:
        raise ErasekitError(f"unknown UI {ui!r}", "choose comfyui or a1111")
    out = Path(output)
    if out.suffix != ".safetensors":
        raise TargetNotWritableError(f"output {out} must end in .safetensors",
                                     "ComfyUI and A1111 list only .safetensors files in their LoRA folders")
    _st.check_new_output(out)
    patch = load_patch(source)
    tensors, dense = export_tensors(patch, ui)
    meta = {k: v for k, v in metadata_for(patch).items() if k != "erasekit"}
    meta["modelspec.hash_sha256"] = "0x" + _data_sha256(tensors)
    if dense:
        meta["ss_network_module"] = "lycoris.kohya"
        meta.pop("ss_network_dim", None)
        meta.pop("ss_network_alpha", None)
        meta["modelspec.architecture"] = meta["modelspec.architecture"].rsplit("/", 1)[0] + "/lycoris"
    meta[EXPORT_KEY] = json.dumps({"ui": ui, "patch_id": patch.patch_id, "manifest": json.loads(manifest_json(patch.manifest))},
                                  sort_keys=True, separators=(",", ":"))
    _st.write_safetensors(out, tensors, meta)
    notes = []
    if dense:
        notes.append(f"A1111 ignores a bias delta beside a low-rank weight delta, so {dense} low-rank modules are "
                     "stored dense (F32) in this file")
    if network_name(patch.manifest.base.architecture, "te2", 0, "fc1", ui):
        notes.append(f"SDXL refiner: modules named as {UI_NAMES[ui]} names the refiner's encoder")
    return ExportReport(str(source), str(out), ui, len(patch.manifest.deltas), dense, out.stat().st_size, notes)


def _data_sha256(tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(tensors[name][2])
    return h.hexdigest()
