"""Merge several patches made for the same base model into one (``erasekit merge``).

The merged patch changes each FFN tensor by the sum of the inputs' deltas, each times its strength: applying it
gives what applying the inputs one after the other gives (up to the rounding of each step). Per module:

- every input that changes it stores it low-rank: the factors are put side by side (``up = [s_A up_A, s_B up_B]``,
  ``down = [down_A; down_B]``, rank ``r_A + r_B``, stored as every low-rank module is, by
  :func:`~erasekit.format.patchfile.lowrank_tensors`), whose product is the sum up to float32 rounding of the scaled
  ``up``; when that would be larger than the dense delta, it is stored dense instead;
- otherwise: the dense float32 sum of the inputs' weight deltas (low-rank ones multiplied out by
  :meth:`Patch.weight_delta`, as apply does);
- bias deltas are always summed in float32 (a projection without a bias, as T5's, has none).

``rank`` overrides that: ``"dense"`` stores every module dense, ``N`` the truncated SVD of the float32 sum at rank
``N`` (as ``erasekit diff --rank`` does). Patches for different bases (architecture, encoder shapes, or a base
tensor both change with different fingerprints) are refused. Recorded evaluations are not carried over: they
measured the inputs' tensors, not the sum.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import JsonValue

from ..errors import ErasekitError, IncompatiblePatchError, NonFiniteError, TargetNotWritableError
from ..families import weight_shape, with_article
from ..format import _st
from ..format.lowrank import truncated_svd
from ..format.names import parse_module_name
from ..format.patchfile import (
    PATCH_SUFFIX,
    Concept,
    DeltaInfo,
    EncoderInfo,
    Method,
    Patch,
    TensorFingerprint,
    compare_fingerprint,
    delta_tensors,
    load_patch,
    lowrank_tensors,
    new_manifest,
    save_patch,
    storage_dtypes,
)
from .apply import per_patch_strengths
from .compat import order_notes
from .undo_record import scaled


@dataclass
class MergedInput:
    path: str
    title: str
    patch_id: str
    strength: float
    concepts: list[str]


@dataclass
class MergedModule:
    module: str
    encoder: str
    layer: int
    proj: str
    sources: int  # how many inputs change it
    storage: str  # "dense" or "rank N"
    # "summed" (dense float32 sum), "concatenated" (factors side by side), "projected" (rank N), and for a module
    # one input changes: "copied" (strength 1) or "scaled"
    how: str
    stored_error: float | None = None  # rank N: the relative (Frobenius) error of the stored factors against the sum


@dataclass
class MergeReport:
    output: str
    output_bytes: int
    patch_id: str
    title: str
    architecture: str
    inputs: list[MergedInput]
    concepts: list[str]
    modules: list[MergedModule]
    dtype: str  # storage dtype of the deltas
    rank: int | str | None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    ui: list[str] = field(default_factory=list)  # how to load the merged patch in ComfyUI and A1111


def _strengths(n: int, strengths: float | Sequence[float] | None) -> list[float]:
    values = per_patch_strengths(n, 1.0 if strengths is None else strengths)
    for s in values:
        if not math.isfinite(s) or s == 0:
            raise ErasekitError(
                f"strength {s:g} cannot be merged",
                "give a finite, non-zero strength (leave a patch out rather than at strength 0)",
                option="strength",
            )
    return values


def _check_rank(rank: int | str | None) -> int | str | None:
    if rank is None or rank == "dense":
        return rank
    if isinstance(rank, str):
        if not rank.isdigit():
            raise ErasekitError(
                f"rank must be a number or dense, got {rank!r}", "give a rank such as 16, or dense", option="rank"
            )
        rank = int(rank)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ErasekitError(f"rank must be at least 1, got {rank}", "use 1 or more, or dense", option="rank")
    return rank


def _check_output(out: Path) -> None:
    _st.check_new_output(out)
    if out.suffix not in (PATCH_SUFFIX, ".safetensors"):
        raise TargetNotWritableError(
            f"output {out} must end in {PATCH_SUFFIX} or .safetensors",
            "name it NAME.erasepatch, or NAME.safetensors for a file ComfyUI and A1111 list",
        )


def _name(p: Patch) -> str:
    return p.path.name if p.path is not None else repr(p.title)


def _prediction(p: Patch) -> str | None:
    """The prediction type of the base the patch was made for, where its manifest tells it."""
    hp = p.manifest.method.hyperparameters.get("prediction_type")
    if hp in ("epsilon", "v_prediction"):
        return hp
    return "v_prediction" if "v_prediction" in (p.manifest.base.config or "") else None


_SAME_BASE = "merge only patches made from the same base model (`erasekit inspect PATCH` shows each one's base)"


def _check_same_base(patches: list[Patch]) -> tuple[dict[str, EncoderInfo], dict[str, TensorFingerprint], list[str]]:
    """The union of the patches' encoders and base fingerprints, refusing patches whose bases differ."""
    first = patches[0]
    encoders: dict[str, tuple[EncoderInfo, Patch]] = {}
    fps: dict[str, tuple[TensorFingerprint, Patch]] = {}
    pred: tuple[str, Patch] | None = None
    notes: list[str] = []
    for p in patches:
        base = p.manifest.base
        if base.architecture != first.manifest.base.architecture:
            raise IncompatiblePatchError(
                f"{_name(first)} is for {first.manifest.base.architecture} but {_name(p)} is for {base.architecture}",
                _SAME_BASE,
            )
        for slot, enc in base.encoders.items():
            if slot in encoders and encoders[slot][0] != enc:
                other = encoders[slot]
                raise IncompatiblePatchError(
                    f"text encoder {slot} is {_dims(other[0])} in {_name(other[1])} but {_dims(enc)} in {_name(p)}",
                    _SAME_BASE,
                )
            encoders.setdefault(slot, (enc, p))
        mine = _prediction(p)
        if mine is not None:
            if pred is not None and pred[0] != mine:
                raise IncompatiblePatchError(
                    f"{_name(pred[1])} was made for {with_article(pred[0])} model but {_name(p)} for {with_article(mine)} one",
                    _SAME_BASE,
                )
            pred = pred or (mine, p)
        for key, fp in sorted(base.tensors.items()):
            if key not in fps:
                fps[key] = (fp, p)
                continue
            ref, owner = fps[key]
            match = compare_fingerprint(ref, fp)
            if match == "differs":
                raise IncompatiblePatchError(
                    f"{_name(owner)} and {_name(p)} were made from different base models (base tensor {key} differs)",
                    _SAME_BASE,
                )
            if match == "approx":
                notes.append(
                    f"{_name(owner)} and {_name(p)} were made from the same base at different precisions "
                    f"({ref.dtype}, {fp.dtype}); the merged patch keeps {_name(owner)}'s fingerprints"
                )
    for i, p in enumerate(patches[1:], 1):
        a = patches[i - 1]
        if (
            not set(a.manifest.base.tensors) & set(p.manifest.base.tensors)
            and a.manifest.base.source != p.manifest.base.source
        ):
            notes.append(
                f"{_name(a)} (from {a.manifest.base.source}) and {_name(p)} (from {p.manifest.base.source}) "
                "change no tensor in common, so their bases cannot be compared; make sure they are the same"
            )
    return {s: e for s, (e, _) in encoders.items()}, {k: f for k, (f, _) in fps.items()}, notes


def _dims(e: EncoderInfo) -> str:
    return f"{e.hidden}x{e.intermediate}, {e.layers} layers"


def _lowrank_parts(p: Patch, module: str, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """``up`` with the module's scale (alpha / rank) and the strength folded in, and ``down``: float32, so that
    ``up @ down`` is the delta apply adds at that strength (up to float32 rounding of the scaled ``up``)."""
    info = p.manifest.deltas[module]
    up = p.tensors[f"{module}.lora_up.weight"]
    down = p.tensors[f"{module}.lora_down.weight"]
    factor = float(p.tensors[f"{module}.alpha"]) / info.rank * strength  # type: ignore[operator]
    if factor != 1:
        up = (up.astype(np.float64) * factor).astype(np.float32)
    return up, down


def _merge_module(
    module: str, parts: list[tuple[Patch, float]], rank: int | str | None
) -> tuple[dict[str, np.ndarray], DeltaInfo, str]:
    """The merged tensors of one module, its DeltaInfo and how they were made."""
    slot, _, proj = parse_module_name(module)  # type: ignore[misc]
    enc = parts[0][0].manifest.base.encoders[slot]
    o, n = weight_shape(proj, enc.hidden, enc.intermediate)
    infos = [p.manifest.deltas[module] for p, _ in parts]
    db: np.ndarray | None = None  # None where no input has a bias delta (a projection without a bias, as T5's)
    for p, s in parts:
        b = p.bias_delta(module)
        if b is not None:
            term = scaled(b, s)
            db = term.copy() if db is None else db + term
    all_lowrank = all(i.storage == "lowrank" for i in infos)
    total_rank = sum(i.rank or 0 for i in infos)
    if rank is None and all_lowrank and (len(parts) == 1 or total_rank * (o + n) < o * n):
        ups, downs = zip(*(_lowrank_parts(p, module, s) for p, s in parts))
        tensors = lowrank_tensors(module, np.concatenate(ups, axis=1), np.concatenate(downs, axis=0))
        tensors |= {f"{module}.diff_b": db} if db is not None else {}
        keep = {"error": infos[0].error, "kept": infos[0].kept} if len(parts) == 1 else {}
        info = DeltaInfo(storage="lowrank", rank=total_rank, bias=db is not None, **keep)
        how = ("copied" if parts[0][1] == 1 else "scaled") if len(parts) == 1 else "concatenated"
    else:
        dw: np.ndarray | None = None
        for p, s in parts:
            term = scaled(p.weight_delta(module), s)
            dw = term.copy() if dw is None else dw + term  # float32, in the patches' order
        assert dw is not None
        factors = truncated_svd(dw, rank) if isinstance(rank, int) else None
        tensors, info = delta_tensors(module, dw, db, factors)
        how = (
            "projected"
            if factors is not None
            else "summed"
            if len(parts) > 1
            else "copied"
            if parts[0][1] == 1
            else "scaled"
        )
    for name, arr in tensors.items():
        if not np.isfinite(arr).all():
            raise NonFiniteError(
                f"the merged delta {name} holds NaN or infinite values; nothing was written",
                "use smaller strengths",
                option="strength",
            )
    return tensors, info, how


def merge_patches(
    paths: Sequence[str | os.PathLike | Patch],
    output: str | os.PathLike,
    *,
    strengths: float | Sequence[float] | None = None,
    rank: int | str | None = None,
    title: str | None = None,
) -> MergeReport:
    """Merge ``paths`` (two or more patches for the same base) into one patch at ``output``, written atomically.

    ``strengths``: one per patch, or one for all (default 1). ``rank``: None (low-rank modules concatenated where
    every input stores them low-rank and that is smaller than dense, else dense float32 sums), ``"dense"`` (every
    module dense) or ``N`` (the truncated SVD of each summed delta at rank N). Nothing is written when anything
    is refused; the inputs are only read."""
    t0 = time.perf_counter()
    if len(paths) < 2:
        raise ErasekitError(
            f"merging needs at least two patches, got {len(paths)}",
            "name two or more .erasepatch files (a single patch is already what merging it gives)",
        )
    rank = _check_rank(rank)
    weights = _strengths(len(paths), strengths)
    out = Path(output)
    _check_output(out)
    patches = [p if isinstance(p, Patch) else load_patch(p) for p in paths]
    encoders, fps, notes = _check_same_base(patches)
    notes = [w for p in patches for w in p.warnings] + notes + order_notes(patches, [])
    seen: dict[str, Patch] = {}
    for p in patches:
        if p.patch_id in seen:
            notes.append(f"{_name(seen[p.patch_id])} and {_name(p)} are the same patch; the merge adds it twice")
        seen.setdefault(p.patch_id, p)
    evaluated = sum(len(p.manifest.evaluations) for p in patches)
    if evaluated:
        notes.append(
            f"{evaluated} recorded evaluation(s) of the inputs are not carried over (they measured the "
            "inputs, not the merge); `erasekit eval --record` measures the merged patch"
        )

    concepts: list[Concept] = []
    for p in patches:
        for c in p.manifest.concepts:
            if all(c.name != k.name for k in concepts):
                concepts.append(Concept(name=c.name, kind=c.kind))
    modules = sorted({m for p in patches for m in p.manifest.deltas}, key=lambda m: parse_module_name(m))  # type: ignore[arg-type,return-value]
    tensors: dict[str, np.ndarray] = {}
    deltas: dict[str, DeltaInfo] = {}
    rows: list[MergedModule] = []
    for m in modules:
        parts = [(p, s) for p, s in zip(patches, weights) if m in p.manifest.deltas]
        stored, deltas[m], how = _merge_module(m, parts, rank)
        tensors.update(stored)
        slot, layer, proj = parse_module_name(m)  # type: ignore[misc]
        info = deltas[m]
        rows.append(
            MergedModule(
                m,
                slot,
                layer,
                proj,
                len(parts),
                "dense" if info.storage == "dense" else f"rank {info.rank}",
                how,
                info.error if how == "projected" else None,
            )
        )

    dtype = _storage_dtype(patches)
    used = {s for s in encoders if any(m.startswith(f"lora_{s}_") for m in deltas)}
    keys = {f"{m}.{kind}" for m, d in deltas.items() for kind in (("weight", "bias") if d.bias else ("weight",))}
    first = patches[0].manifest
    prediction = next((pt for p in patches if (pt := _prediction(p)) is not None), None)
    method = Method(
        name="merge",
        hyperparameters={
            "patches": [_part(p, s) for p, s in zip(patches, weights)],
            "rank": rank,
            **({"prediction_type": prediction} if prediction else {}),
        },
    )
    manifest = new_manifest(
        title=title or " + ".join(dict.fromkeys(p.title for p in patches)),
        architecture=first.base.architecture,
        encoders={s: e for s, e in encoders.items() if s in used},
        fingerprints={k: fps[k] for k in sorted(keys)},
        deltas=deltas,
        method=method,
        concepts=concepts,
        source=first.base.source,
        config=next((p.manifest.base.config for p in patches if p.manifest.base.config), None),
    )
    patch = Patch(manifest, tensors, storage_dtypes(tensors, dtype))
    save_patch(patch, out)
    from ..format.ui_export import ui_advice

    return MergeReport(
        str(out),
        out.stat().st_size,
        patch.patch_id,
        manifest.title,
        first.base.architecture,
        [
            MergedInput(
                str(p.path) if p.path is not None else p.title,
                p.title,
                p.patch_id,
                s,
                [c.name for c in p.manifest.concepts],
            )
            for p, s in zip(patches, weights)
        ],
        [c.name for c in concepts],
        rows,
        dtype,
        rank,
        time.perf_counter() - t0,
        notes,
        ui_advice(patch, out),
    )


def _part(p: Patch, strength: float) -> dict[str, JsonValue]:
    """How a merge records one of its parts; a merged part keeps its own parts, so that a merge of merges names
    every patch it holds (an apply refuses one that would apply a patch twice: :func:`.compat.applied_twice`)."""
    nested = p.manifest.method.hyperparameters.get("patches") if p.manifest.method.name == "merge" else None
    return {"patch_id": p.patch_id, "title": p.title, "strength": strength, **({"patches": nested} if nested else {})}


def _storage_dtype(patches: list[Patch]) -> str:
    """The storage dtype of the merged deltas: the inputs' when they all store one (F16, BF16 or F32), else F32."""
    found = {d for p in patches for n, d in p.dtypes.items() if not n.endswith(".alpha")}
    return found.pop() if len(found) == 1 else "F32"


__all__ = ["MergeReport", "MergedInput", "MergedModule", "merge_patches"]
