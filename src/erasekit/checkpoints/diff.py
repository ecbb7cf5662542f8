"""Compare two checkpoints (FFN change table, optionally extracted as a patch) or two patches."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ErasekitError, IncompatiblePatchError
from ..format.lowrank import truncated_svd
from ..format.names import module_name
from ..format.patchfile import (
    STORED_DTYPES,
    DeltaInfo,
    EncoderInfo,
    Method,
    Patch,
    delta_inner,
    delta_norm,
    delta_tensors,
    fingerprint,
    is_patch_file,
    load_patch,
    new_manifest,
    save_patch,
    storage_dtypes,
)
from ..format.ui_export import ui_advice
from .hub import TEXT_ENCODERS, resolve_model
from .layouts import Checkpoint, WeightFile, check_ffn_dtypes, detect


@dataclass
class LayerChange:
    encoder: str
    layer: int
    proj: str
    shape: list[int]
    delta_norm: float
    base_norm: float
    relative: float
    bias_delta_norm: float | None  # None: the projection has no bias (T5)
    stored_error: float | None = None  # with -o and a rank: relative (Frobenius) error of the stored factors


@dataclass
class LayerComparison:
    module: str
    encoder: str
    layer: int
    proj: str
    norm_a: float
    norm_b: float
    cosine: float | None  # None when either side is missing or zero
    norm_ratio: float | None  # |b| / |a|


@dataclass
class DiffReport:
    kind: str  # "checkpoints" | "patches"
    a: str
    b: str
    architecture: str
    changes: list[LayerChange] = field(default_factory=list)
    comparisons: list[LayerComparison] = field(default_factory=list)
    other_changed: list[str] = field(default_factory=list)  # non-FFN text-encoder tensors that differ ("te:KEY")
    other_relative: list[float] = field(default_factory=list)  # their relative change |B-A|/|A|, same order
    output: str | None = None
    output_bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    ui: list[str] = field(default_factory=list)  # how to load the extracted patch in ComfyUI and A1111


def _first_files(a: Checkpoint, b: Checkpoint) -> dict[str, tuple[WeightFile, WeightFile]]:
    """For each encoder slot both have, the file holding it (the first variant of a diffusers folder)."""
    out: dict[str, tuple[WeightFile, WeightFile]] = {}
    for slot in sorted(set(a.encoders) & set(b.encoders)):
        fa = next(f for f in a.files if slot in f.encoders)
        fb = next(f for f in b.files if slot in f.encoders)
        out[slot] = (fa, fb)
    return out


def _other_changes(fa: WeightFile, fb: WeightFile, slot: str) -> list[tuple[str, float]]:
    """Text-encoder tensors outside the FFN that differ between A and B, with their relative change |B-A|/|A|."""
    ea, eb = fa.encoders[slot], fb.encoders[slot]
    ffn = {k for _, k, *_ in fa.ffn_keys()}
    info_a, info_b = fa.tensor_info(), fb.tensor_info()
    changed = []
    for key in sorted(info_a):
        if not key.startswith(ea.prefix) or key in ffn:
            continue
        other = eb.prefix + key[len(ea.prefix) :]
        if other not in info_b:
            continue
        if info_a[key] == info_b[other] and fa.read_raw(key) == fb.read_raw(other):
            continue
        va, vb = fa.read_numpy(key).astype(np.float64), fb.read_numpy(other).astype(np.float64)
        if va.shape != vb.shape:
            changed.append((key, float("inf")))
        elif not np.array_equal(va, vb):
            norm = float(np.linalg.norm(va))
            changed.append((key, float(np.linalg.norm(vb - va)) / norm if norm else float("inf")))
    return changed


def diff_checkpoints(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    title: str | None = None,
    rank: int | None = None,
    dtype: str = "F32",
    ffn_only: bool = False,
) -> DiffReport:
    """Per-layer FFN change from A to B; with ``output``, the change as a patch that turns A into B. A patch
    carries FFN changes only: when B also differs elsewhere in the text encoder, writing one is refused unless
    ``ffn_only`` (the patch then records what it leaves out)."""
    t0 = time.perf_counter()
    if dtype not in STORED_DTYPES:
        raise ErasekitError(f"unknown patch dtype {dtype}", "use F32, F16 or BF16")
    if rank is not None and rank < 1:
        raise ErasekitError(
            f"rank must be at least 1, got {rank}", "use 1 or more, or no rank for dense deltas", option="rank"
        )
    from .in_place import read_consistently

    ca, cb = detect(resolve_model(a, TEXT_ENCODERS)), detect(resolve_model(b, TEXT_ENCODERS))
    check_ffn_dtypes(ca)
    check_ffn_dtypes(cb)
    if ca.architecture != cb.architecture:
        raise IncompatiblePatchError(
            f"{ca.path} is {ca.architecture} but {cb.path} is {cb.architecture}",
            "diff two checkpoints of the same architecture",
        )
    # one state of each (never a half-applied file), measured again if an in-place write lands meanwhile
    m = read_consistently(ca, lambda: read_consistently(cb, lambda: _measure(ca, cb, rank)))
    report, tensors, deltas, fps = m.report, m.tensors, m.deltas, m.fingerprints
    if report.other_changed:
        report.notes.append(
            f"{len(report.other_changed)} text-encoder tensors outside the FFN layers differ (e.g. "
            f"{report.other_changed[0]}); a patch carries only FFN changes"
        )
    if output is not None:
        if not deltas:
            raise ErasekitError(f"{ca.path} and {cb.path} have identical FFN weights", "there is nothing to extract")
        if report.other_changed and not ffn_only:
            left = _left_out(report)["left_out"]
            raise ErasekitError(
                f"{cb.path.name} also differs from {ca.path.name} outside the FFN layers, in "
                f"{left['tensors']} text-encoder tensors (largest: {left['largest']}, "
                f"relative change {left['largest_relative']:.2e}); a patch of the FFN part would not "
                "reproduce the edit",
                "ask for the FFN part only to write it anyway (the patch records "
                "what it leaves out, and inspect shows it)",
                option="ffn_only",
            )
        out = Path(output)
        if out.exists():
            from ..errors import TargetNotWritableError

            raise TargetNotWritableError(f"{out} already exists", "choose a new output name, or delete it first")
        used = {s for s in ca.encoders if any(m.startswith(f"lora_{s}_") for m in deltas)}
        encoders = {
            s: EncoderInfo(hidden=e.hidden, intermediate=e.intermediate, layers=e.layers)
            for s, e in ca.encoders.items()
            if s in used
        }
        manifest = new_manifest(
            title=title or f"{cb.path.stem} minus {ca.path.stem}",
            architecture=ca.architecture,
            encoders=encoders,
            fingerprints=fps,
            deltas=deltas,
            method=Method(
                name="diff",
                hyperparameters={"a": ca.path.name, "b": cb.path.name, "rank": rank, "dtype": dtype}
                | _prediction(ca)
                | _left_out(report)
                | ({"after": m.after} if m.after else {}),
            ),
            source=ca.path.name,
        )
        patch = Patch(manifest, tensors, storage_dtypes(tensors, dtype))
        save_patch(patch, out)
        report.output, report.output_bytes = str(out), out.stat().st_size
        report.ui = ui_advice(patch, out)
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class _Measured:
    """The FFN change from A to B: the report's table, and the patch's tensors, deltas, base fingerprints and
    ``after`` (A's patches applied in place)."""

    report: DiffReport
    tensors: dict[str, np.ndarray]
    deltas: dict[str, DeltaInfo]
    fingerprints: dict[str, Any]
    after: list[dict[str, str]]


def _measure(ca: Checkpoint, cb: Checkpoint, rank: int | None) -> _Measured:
    """The FFN change from A to B, layer by layer. A's patches applied in place: the patch goes on top of them,
    so (as an erase's) its base fingerprints are of the tensors below them, and it records them as made after
    them."""
    from .in_place import applied_in_place, pristine_reader

    below_a, after = pristine_reader(ca), applied_in_place(ca)
    report = DiffReport("checkpoints", str(ca.path), str(cb.path), ca.architecture)
    tensors: dict[str, np.ndarray] = {}
    deltas: dict[str, DeltaInfo] = {}
    fps = {}
    for slot, (fa, fb) in _first_files(ca, cb).items():
        ea, eb = fa.encoders[slot], fb.encoders[slot]
        if ea.dims != eb.dims:
            raise IncompatiblePatchError(
                f"text encoder {slot} is {ea.dims} in {ca.path} but {eb.dims} in {cb.path}",
                "diff two checkpoints of the same model family",
            )
        for key, rel in _other_changes(fa, fb, slot):
            report.other_changed.append(f"{slot}:{key}")
            report.other_relative.append(rel)
        for layer in range(ea.layers):
            for proj in ea.projections:
                wa, dw = _change(fa, fb, ea.key(layer, proj, "weight"), eb.key(layer, proj, "weight"))
                db = _change(fa, fb, ea.key(layer, proj, "bias"), eb.key(layer, proj, "bias"))[1] if ea.biased else None
                dn, an = float(np.linalg.norm(dw)), float(np.linalg.norm(wa))
                bn = float(np.linalg.norm(db)) if db is not None else None
                report.changes.append(
                    LayerChange(slot, layer, proj, list(wa.shape), dn, an, dn / an if an else 0.0, bn)
                )
                if not dw.any() and not bn:
                    continue
                m = module_name(slot, layer, proj)
                stored, deltas[m] = delta_tensors(m, dw, db, truncated_svd(dw, rank) if rank else None)
                report.changes[-1].stored_error = deltas[m].error
                tensors.update(stored)
                for kind in ea.encoder_kind.tensor_kinds:
                    key = ea.key(layer, proj, kind)
                    ent_dtype, ent_shape = fa.tensor_info()[key]
                    fps[f"{m}.{kind}"] = fingerprint(below_a(fa, key), ent_dtype, ent_shape)
    return _Measured(report, tensors, deltas, fps, after)


def _change(fa: WeightFile, fb: WeightFile, key_a: str, key_b: str) -> tuple[np.ndarray, np.ndarray]:
    """A's tensor (float32) and B's minus A's (float64)."""
    a = fa.read_numpy(key_a)
    return a, fb.read_numpy(key_b).astype(np.float64) - a.astype(np.float64)


def _left_out(report: DiffReport) -> dict[str, Any]:
    """What an ``ffn_only`` patch does not carry: ``{"left_out": {"tensors", "largest", "largest_relative"}}``."""
    if not report.other_changed:
        return {}
    top = max(range(len(report.other_changed)), key=lambda i: report.other_relative[i])
    return {
        "left_out": {
            "tensors": len(report.other_changed),
            "largest": report.other_changed[top],
            "largest_relative": report.other_relative[top],
        }
    }


def _prediction(ckpt: Checkpoint) -> dict[str, str]:
    """``{"prediction_type": ...}`` where the base tells it (ModelSpec names SD2.x 512 and 768-v apart)."""
    from .model_configs import prediction_of

    pred = prediction_of(ckpt)
    return {"prediction_type": pred} if pred else {}


def compare_patches(a: Patch, b: Patch) -> DiffReport:
    """Per-layer cosine similarity and norm ratio of two patches' weight deltas."""
    from .compat import crossing_note, slot_map

    # B's encoders onto A's by the rule apply uses (a clip-text patch meets a pipeline's encoder of equal shapes)
    mapping = slot_map(
        b,
        a.manifest.base.architecture,
        a.manifest.base.encoders,  # type: ignore[arg-type]
        f"patch '{a.title}' ({a.manifest.base.architecture})",
    )
    report = DiffReport("patches", str(a.path or a.title), str(b.path or b.title), a.manifest.base.architecture)
    note = crossing_note(b, a.manifest.base.architecture, mapping)
    report.notes += [note] if note else []
    b_mapped = [(m, s, layer, p) for m, s, layer, p in b.modules() if s in mapping]  # A bare: one part of B
    b_as_a = {module_name(mapping[s], layer, p): m for m, s, layer, p in b_mapped}
    mods = {m: (s, layer, p) for m, s, layer, p in a.modules()}
    mods |= {module_name(mapping[s], layer, p): (mapping[s], layer, p) for _, s, layer, p in b_mapped}
    for m in sorted(mods, key=lambda x: (mods[x][0], mods[x][1], mods[x][2])):
        s, layer, p = mods[m]
        da = a.weight_factors(m) if m in a.manifest.deltas else None  # factors, never multiplied out
        db = b.weight_factors(b_as_a[m]) if m in b_as_a else None
        na = delta_norm(da) if da is not None else 0.0
        nb = delta_norm(db) if db is not None else 0.0
        cos = delta_inner(da, db) / (na * nb) if da is not None and db is not None and na and nb else None
        report.comparisons.append(LayerComparison(m, s, layer, p, na, nb, cos, nb / na if na else None))
    return report


def diff_paths(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    title: str | None = None,
    rank: int | None = None,
    dtype: str = "F32",
    ffn_only: bool = False,
) -> DiffReport:
    """Two patches -> :func:`compare_patches`; two checkpoints -> :func:`diff_checkpoints`."""
    pa, pb = is_patch_file(a), is_patch_file(b)
    if pa and pb:
        if output is not None:
            raise ErasekitError(
                "an output patch is extracted from two checkpoints, not from two patches",
                "do not ask for an output",
                option="output",
            )
        t0 = time.perf_counter()
        report = compare_patches(load_patch(a), load_patch(b))
        report.seconds = time.perf_counter() - t0
        return report
    if pa or pb:
        raise ErasekitError(
            f"cannot diff a patch with a checkpoint ({a if pa else b} is a patch)",
            "diff two patches, or two checkpoints; inspecting a patch against a checkpoint compares the two",
        )
    return diff_checkpoints(a, b, output=output, title=title, rank=rank, dtype=dtype, ffn_only=ffn_only)


__all__ = ["DiffReport", "LayerChange", "LayerComparison", "compare_patches", "diff_checkpoints", "diff_paths"]
