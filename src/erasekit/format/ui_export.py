"""Patches as ComfyUI, AUTOMATIC1111 and diffusers load them: which files load as they are, and exports for each.

A patch's tensors are named like a kohya/LyCORIS text-encoder network, which both UIs read. Two cases need a file
made for one UI (``erasekit export PATCH --ui comfyui|a1111``):

- the SDXL refiner: its only encoder is OpenCLIP bigG. ComfyUI maps ``lora_te_...`` (not ``lora_te2_...``) to it
  when no CLIP-L is present; A1111 knows it only by its own layer name ``0_model_transformer_resblocks_{i}_mlp_c_fc``
  (``c_proj`` for fc2). No name serves both. (A family's ``ui_modules``, :mod:`erasekit.families`.)
- low-rank deltas in A1111: its LoRA module type never reads ``.diff_b``, so a bias delta beside
  ``.lora_up/.lora_down`` would be dropped silently. The A1111 export stores such modules as LyCORIS "full"
  modules (``.diff`` = the multiplied-out weight delta, F32, and ``.diff_b``), which A1111 applies exactly; the
  export is as large as a dense patch. ComfyUI reads ``.diff_b`` beside a LoRA, so its file stays low-rank.

Both UIs list only ``.safetensors`` (and pickle suffixes they open with ``torch.load``) in their LoRA folders, so
every file meant for a UI is named ``NAME.safetensors``.

diffusers (``pipe.load_lora_weights``) reads no patch as it is: its kohya converter refuses ``.diff`` and ``.diff_b``,
which every patch of ``erase`` and ``diff`` holds. ``--ui diffusers`` writes diffusers' own text-encoder format,
``text_encoder[_2].text_model.encoder.layers.{i}.mlp.fc{1,2}.lora_linear_layer.`` + ``down.weight`` (peft's
``lora_A``), ``up.weight`` (``lora_B``, with the module's scale in it) and ``up.bias`` (``lora_B.bias``: the bias
delta, which turns on peft's ``lora_bias`` and is scaled like the weight). Not peft's own key names: diffusers infers
a text encoder's format from its keys and knows peft keys there only on the attention projections. A dense delta
becomes exact factors, an identity on its smaller side. The file has no alphas, so diffusers sets alpha = rank
(scale 1); every module of one encoder is written at one rank (zero-padded to the largest), so that no version from
0.35 on needs a per-module pattern (before 0.40, mixed ranks without alphas got wrong scales).

T5 (a ``t5-text`` patch): ComfyUI loads its ``lora_te3_`` modules as they are; A1111 runs no T5 and diffusers loads
no LoRA into one (an encoder kind's ``uis``), so neither gets a file: the export is refused. FLUX.1 and SD3.x patches
(``lora_te1_`` CLIP-L, ``lora_te2_`` CLIP-G, ``lora_te3_`` T5) load in ComfyUI as they are; erasekit exports them for
no other UI yet (a family's ``uis``). Torch-free.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ErasekitError, IncompatiblePatchError, TargetNotWritableError
from ..families import PIPELINES, family, listing, with_article
from ..families.base import EncoderKind
from ..families.encoders import NAMINGS
from . import _st
from .patchfile import Patch, load_patch, manifest_json, metadata_for

UIS = ("comfyui", "a1111", "diffusers")
UI_NAMES = {"comfyui": "ComfyUI", "a1111": "AUTOMATIC1111", "diffusers": "diffusers"}
EXPORT_KEY = "erasekit_export"  # metadata key of an export: {"ui", "patch_id", "manifest"}


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
    own = family(architecture).ui_modules.get(ui)
    if own is None:
        return None
    prefix, naming = own
    return prefix + NAMINGS[naming].module(layer, proj)


def _bias_beside_lowrank(patch: Patch) -> list[str]:
    return [m for m, d in patch.manifest.deltas.items() if d.storage == "lowrank" and d.bias]


def unreached(patch: Patch, ui: str) -> EncoderKind | None:
    """The kind of a text encoder the patch changes that ``ui`` loads no network into (A1111 and diffusers: T5);
    None where it reaches them all."""
    arch = family(patch.manifest.base.architecture)
    return next((k for k in (arch.slot(s).encoder.kind for s in patch.manifest.base.encoders) if ui not in k.uis), None)


def _check_reached(patch: Patch, ui: str) -> None:
    base = family(patch.manifest.base.architecture)
    if ui not in base.uis:
        raise IncompatiblePatchError(
            f"erasekit has no {UI_NAMES[ui]} export for {base.title} patches yet",
            f"load the patch in {listing([UI_NAMES[u] for u in base.uis], 'or')} as it is, or apply it to the "
            "model's files (erasekit apply)",
        )
    kind = unreached(patch, ui)
    if kind is not None:
        others = [UI_NAMES[u] for u in kind.uis]
        raise IncompatiblePatchError(
            f"{UI_NAMES[ui]} loads no network into {with_article(kind.title)} text encoder",
            f"load the patch in {listing(others, 'or')}, or apply it to the encoder itself (erasekit apply)",
        )


def loads_as_is(patch: Patch, ui: str) -> bool:
    """Whether ``ui`` applies every tensor of the patch file as erasekit does, with the file just renamed
    to ``.safetensors``."""
    base = family(patch.manifest.base.architecture)
    if ui == "diffusers" or base.ui_modules or ui not in base.uis or unreached(patch, ui):
        return False
    return ui == "comfyui" or not _bias_beside_lowrank(patch)


def ui_advice(patch: Patch, path: str | os.PathLike) -> list[str]:
    """One line per UI: where to put the file, the export command that makes one, or that it loads none."""
    path = Path(path)
    name = path.with_suffix(".safetensors").name
    lines = []
    base = family(patch.manifest.base.architecture)
    for ui in UIS:
        kind = unreached(patch, ui)
        if ui not in base.uis:
            how = f"no export for {base.title} patches yet"
        elif kind is not None:
            how = f"loads no network into {with_article(kind.title)} text encoder"
        elif loads_as_is(patch, ui):
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
            parts = {
                ".diff": (patch.weight_delta(module), "F32"),
                ".diff_b": (patch.tensors[f"{module}.diff_b"], "F32"),
            }
        else:
            parts = {
                t[len(module) :]: (patch.tensors[t], patch.dtypes[t])
                for t in patch.tensors
                if t.startswith(module + ".")
            }
        for suffix, (arr, dtype) in parts.items():
            arr = np.asarray(arr, dtype=np.float32)
            out[name + suffix] = (dtype, tuple(arr.shape), _st.encode(arr, dtype))
    return out, len(dense_for_bias)


def diffusers_component(patch: Patch, slot: str) -> str:
    """The diffusers pipeline component (and LoRA key prefix) that holds ``slot``'s encoder;
    :class:`IncompatiblePatchError` where diffusers loads no LoRA into it. A bare text encoder goes to the component
    of the pipelines' encoders of its width (text_encoder_2 for OpenCLIP bigG, which diffusers has only as SDXL's
    second encoder), else to the first."""
    arch = patch.manifest.base.architecture
    held = family(arch).slot(slot)
    if "diffusers" not in held.encoder.kind.uis:
        raise IncompatiblePatchError(
            f"diffusers' load_lora_weights loads no LoRA into the {arch} text encoder {slot}",
            "apply the patch in memory instead: erasekit.apply_patch(pipe, patch)",
        )
    if family(arch).bare:
        width = patch.manifest.base.encoders[slot].hidden
        widths = {
            s.encoder.largest[0]: s.component for f in PIPELINES for s in f.slots if s.encoder.kind is held.encoder.kind
        }
        return widths.get(width, held.component)
    return held.component


def lora_factors(patch: Patch, module: str) -> tuple[np.ndarray, np.ndarray]:
    """(B, A), out x r and r x in, with ``B @ A`` = ``module``'s weight delta: the patch's low-rank factors with
    their scale in B, or a dense delta beside an identity on its smaller side (r = min(out, in), exact)."""
    up, down = patch.weight_factors(module)
    if down is not None:
        return up, down
    out_dim, in_dim = up.shape
    return (up, np.eye(in_dim)) if in_dim <= out_dim else (np.eye(out_dim), up)


def diffusers_tensors(patch: Patch) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """The patch in diffusers' text-encoder format (see the module docstring), F32: one rank and, where any module
    has a bias delta, an ``up.bias`` for every module of each encoder (zeros where it has none)."""
    groups: dict[str, list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]] = {}
    for module, slot, layer, proj in patch.modules():
        component = diffusers_component(patch, slot)
        naming = family(patch.manifest.base.architecture).slot(slot).encoder.kind.namings[0]
        key = f"{component}.{naming.root}{naming.path(layer, proj)}.lora_linear_layer"
        groups.setdefault(component, []).append((key, *lora_factors(patch, module), patch.bias_delta(module)))
    out: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for members in groups.values():
        rank = max(b.shape[1] for _, b, _, _ in members)
        with_bias = any(bias is not None for *_, bias in members)
        for key, b, a, bias in members:
            parts = {
                "up.weight": np.pad(b, ((0, 0), (0, rank - b.shape[1]))),
                "down.weight": np.pad(a, ((0, rank - a.shape[0]), (0, 0))),
            }
            if with_bias:
                parts["up.bias"] = np.zeros(b.shape[0]) if bias is None else bias
            for suffix, arr in parts.items():
                arr = np.asarray(arr, dtype=np.float32)
                out[f"{key}.{suffix}"] = ("F32", tuple(arr.shape), _st.encode(arr, "F32"))
    return out


def _check_output(out: Path, ui: str) -> None:
    if out.suffix == ".safetensors":
        return
    if ui == "diffusers":
        raise TargetNotWritableError(
            f"output {out} must end in .safetensors",
            "name it NAME.safetensors: diffusers' load_lora_weights reads other names as torch pickles",
        )
    raise TargetNotWritableError(
        f"output {out} must end in .safetensors", "ComfyUI and A1111 list only .safetensors files in their LoRA folders"
    )


def export_patch(source: str | os.PathLike, ui: str, output: str | os.PathLike) -> ExportReport:
    """Write the patch at ``source`` as a file ``ui`` loads with every tensor matched and erasekit's weights."""
    if ui not in UIS:
        raise ErasekitError(f"unknown UI {ui!r}", "choose comfyui, a1111 or diffusers")
    out = Path(output)
    _check_output(out, ui)
    _st.check_new_output(out)
    patch = load_patch(source)
    _check_reached(patch, ui)
    if ui == "diffusers":
        return _export_diffusers(patch, source, out)
    tensors, dense = export_tensors(patch, ui)
    meta = {k: v for k, v in metadata_for(patch).items() if k != "erasekit"}
    meta["modelspec.hash_sha256"] = "0x" + _data_sha256(tensors)
    if dense:
        meta["ss_network_module"] = "lycoris.kohya"
        meta.pop("ss_network_dim", None)
        meta.pop("ss_network_alpha", None)
        meta["modelspec.architecture"] = meta["modelspec.architecture"].rsplit("/", 1)[0] + "/lycoris"
    meta[EXPORT_KEY] = json.dumps(
        {"ui": ui, "patch_id": patch.patch_id, "manifest": json.loads(manifest_json(patch.manifest))},
        sort_keys=True,
        separators=(",", ":"),
    )
    _st.write_safetensors(out, tensors, meta)
    notes = []
    if dense:
        notes.append(
            f"A1111 ignores a bias delta beside a low-rank weight delta, so {dense} low-rank modules are "
            "stored dense (F32) in this file"
        )
    base = family(patch.manifest.base.architecture)
    if ui in base.ui_modules:
        notes.append(f"{base.title}: modules named as {UI_NAMES[ui]} names its encoder")
    return ExportReport(str(source), str(out), ui, len(patch.manifest.deltas), dense, out.stat().st_size, notes)


def _export_diffusers(patch: Patch, source: str | os.PathLike, out: Path) -> ExportReport:
    tensors = diffusers_tensors(patch)
    meta = {k: v for k, v in metadata_for(patch).items() if k != "erasekit" and not k.startswith("ss_")}
    meta["modelspec.hash_sha256"] = "0x" + _data_sha256(tensors)
    meta["modelspec.architecture"] = meta["modelspec.architecture"].rsplit("/", 1)[0] + "/lora"
    meta[EXPORT_KEY] = json.dumps(
        {"ui": "diffusers", "patch_id": patch.patch_id, "manifest": json.loads(manifest_json(patch.manifest))},
        sort_keys=True,
        separators=(",", ":"),
    )
    _st.write_safetensors(out, tensors, meta)
    return ExportReport(
        str(source), str(out), "diffusers", len(patch.manifest.deltas), 0, out.stat().st_size, _diffusers_notes(patch)
    )


def _diffusers_notes(patch: Patch) -> list[str]:
    notes = []
    shapes = [patch.weight_shape(m) for m, d in patch.manifest.deltas.items() if d.storage == "dense"]
    if shapes:
        factors = sum((o + i) * min(o, i) for o, i in shapes) / sum(o * i for o, i in shapes)
        notes.append(
            f"{len(shapes)} dense modules are stored as exact factors (an identity on the smaller side, "
            f"F32): {factors:.2f}x the size of their deltas (1.25x for real CLIP encoders)"
        )
    if family(patch.manifest.base.architecture).bare:
        (slot,) = {s for _, s, _, _ in patch.modules()}
        notes.append(f"a bare text encoder's patch: written for the pipeline's {diffusers_component(patch, slot)}")
    return notes


def _data_sha256(tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(tensors[name][2])
    return h.hexdigest()
